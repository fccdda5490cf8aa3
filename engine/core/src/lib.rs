//! # postback-core
//!
//! The domain of the postback engine and the seams between it and the outside world.
//!
//! It is: identifiers (`ids`), the log's event envelope (`event`), request parameters
//! (`params`), the catalog of advertisers, offers, partners and postback settings (`catalog`),
//! the processing rules of a postback (`rules`), the batch processor (`processor`), affiliate
//! postbacks (`delivery`) and the addresses they may reach (`address`), and the seam traits
//! with their in-memory implementations (`seams`).
//!
//! It is not: an HTTP server, a log on disk, a database client or a clock. It depends on no IO
//! crate and reads no time or randomness of its own; callers pass them in. That keeps every
//! rule unit-testable, fuzzable and benchmarkable alone.

pub mod address;
pub mod catalog;
pub mod delivery;
pub mod event;
pub mod ids;
pub mod keys;
pub mod log;
pub mod macros;
pub mod memory_store;
pub mod params;
pub mod processor;
pub mod rules;
pub mod seams;
pub mod store_conformance;

#[cfg(test)]
mod rules_tests;
