//! # postbackd
//!
//! The postback engine's server: the HTTP front end (hyper), the embedded event log, the
//! embedded analytics store (SQLite), the stream processor that joins them, and the stats API.
//!
//! It is not the domain logic: the rules, the catalog and the processor's decisions live in
//! `postback-core`, which this crate drives. See `engine/ARCHITECTURE.md` for the map.

pub mod admin;
pub mod backends;
pub mod config;
pub mod console;
pub mod cores;
pub mod dispatcher;
pub mod embedded_log;
pub mod engine;
pub mod export;
pub mod guard;
pub mod http;
pub mod line_sets;
pub mod live;
pub mod paging;
pub mod pipeline;
pub mod priority;
pub mod sqlite_store;
pub mod stats;
pub mod tracking;

pub use config::{Config, Overrides};
pub use engine::{Engine, Server};
