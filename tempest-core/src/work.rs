//! The units of work between the hub and a task instance.
//!
//! The hub hands a task instance [`Delivery`]s; the instance hands back one
//! [`Handled`] per delivery, in order. Both carry the [`RootId`] so the hub
//! can settle the root's tree in the ledger without a lookup.

use crate::ledger::RootId;
use crate::{Msg, TaskResult};

/// A message handed to a task instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// The root whose tree the message belongs to.
    pub root: RootId,
    /// The message.
    pub msg: Msg,
}

/// What a task instance made of one [`Delivery`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handled {
    /// The root of the message handled.
    pub root: RootId,
    /// The task's result.
    pub result: TaskResult,
}
