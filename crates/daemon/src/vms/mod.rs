//! The VMs: how their definitions are kept ([`definition`]), their state directory
//! ([`store`]), their VMM processes ([`process`]), and their life ([`supervisor`]).

pub mod definition;
pub mod file_dirs;
pub mod process;
pub mod store;
pub mod supervisor;
