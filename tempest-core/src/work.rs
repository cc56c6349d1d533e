//! The units of work between whoever routes messages (the standalone hub, a
//! worker's outbox) and a task instance.
//!
//! A task instance is handed [`Delivery`]s and hands back one [`Handled`]
//! per delivery, in order. Both carry the [`RootId`] and the [`EdgeId`], so
//! the root's tree can be settled in the ledger without a lookup.

use crate::ledger::{EdgeId, RootId};
use crate::{Msg, TaskResult};

/// A message handed to a task instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The root whose tree the message belongs to.
    pub root: RootId,
    /// The message's id in that tree (see [`crate::ledger`]).
    pub edge: EdgeId,
    /// The message.
    pub msg: Msg,
}

/// What a task instance made of one [`Delivery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handled {
    /// The root of the message handled.
    pub root: RootId,
    /// The id of the message handled.
    pub edge: EdgeId,
    /// The task's result.
    pub result: TaskResult,
}
