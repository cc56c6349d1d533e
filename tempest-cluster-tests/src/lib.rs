//! The Docker cluster fault suite lives in `tests/docker.rs`; this crate has
//! no library code.
//!
//! The suite builds the images of `docker-compose.yml` from binaries compiled
//! on the host (and the Debian base image with `scripts/docker-base-image`
//! when it is missing), brings the cluster up under a project name of its
//! own, deploys word count reading a Redis stream with its workers spread
//! over the three agents (task messages cross the compose network on peer
//! links, which it checks), feeds it 200,000 sentences, and checks every one
//! is counted, with no more duplicates than were in flight, while an agent
//! is killed, an agent is cut off the network, the director is restarted
//! and Redis is restarted. It needs Docker: without it the suite fails, it
//! never skips.
