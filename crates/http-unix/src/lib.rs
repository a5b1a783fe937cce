//! HTTP/1.1 over Unix sockets, blocking, for the small JSON control APIs of Ferro: the server
//! side reads one request at a time from a connection and writes a response; the client side
//! sends one request per connection. Parsing is `httparse`; framing (Content-Length bodies,
//! size limits, keep-alive) is here.
//!
//! No threads of its own: callers decide how connections are served. Every read is bounded
//! (header and body limits) so a hostile or broken peer cannot make it allocate without end;
//! a server bounds the time of a whole request with [`DeadlineReader`] (one deadline for all
//! its reads, 408 when it passes), a client's reads are the socket's (`set_read_timeout`).

// No unsafe code here: host calls belong in host-sys, KVM calls in hypervisor.
#![forbid(unsafe_code)]

mod client;
mod deadline;
mod message;

pub use client::{BodyReader, Client, ClientError, ClientResponse};
pub use deadline::DeadlineReader;
pub use message::{read_request, write_response, HttpError, Method, Request, Response};

/// Largest request or response head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 << 10;
/// Largest body accepted.
pub const MAX_BODY: usize = 1 << 20;
