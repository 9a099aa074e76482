//! flashcore: a trading core for e-commerce flash sales.
//!
//! The data flow of a change:
//!
//! ```text
//! request -> tower layers -> extractors -> thin handler -> Engine
//!   -> SKU actor: pure decide, journal the Event, apply, answer with a ticket
//!   -> order shard: decide, journal, apply, forward the SKU moves
//!   -> journal thread: batch, write, fdatasync, release the batch's tickets
//!   -> Engine waits for the ticket -> 2xx (strict mode)
//! ```
//!
//! State changes only through the `apply` functions of [`domain`], which
//! recovery replays too. One FIFO journal means the durable part is always a
//! prefix of what was applied.
//!
//! - [`limits`]: every bound, with its reason.
//! - [`clock`]: time as a value, below the engine and the journal alike.
//! - [`files`]: durable files and directory entries, below the journal and
//!   the HTTP front alike (the journal's data dir, the JWT secret).
//! - [`domain`]: pure types, decisions and `apply`; no I/O, no clock.
//! - [`engine`]: the actors and the [`engine::Engine`] handle, the only entry
//!   point for the HTTP front, tests and benches.
//! - [`journal`]: where events go to become durable.
//! - [`http`]: the axum front, exactly as `../shared/API.md` says.
//! - [`cluster`]: cluster mode over NATS JetStream (`serve --cluster`).
//! - [`server`]: start-up, the storage supervisor, the accept loop, shutdown.
//! - [`faults`]: test-only fault hooks (empty unless built with `faults`).

// No unsafe code, but for the one `malloc_trim` call in `memory.rs`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod clock;
pub mod cluster;
pub mod domain;
pub mod engine;
pub mod fatal;
pub mod faults;
pub mod files;
pub mod http;
pub mod journal;
pub mod limits;
#[allow(unsafe_code)]
pub mod memory;
pub mod server;
pub mod steps;
