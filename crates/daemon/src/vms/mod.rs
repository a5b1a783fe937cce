//! The VMs: their definitions on disk ([`store`]), their VMM processes ([`process`]), and
//! their life ([`supervisor`]).

pub mod process;
pub mod store;
pub mod supervisor;
