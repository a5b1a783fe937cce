//! Client side: one request per connection (`Connection: close`).

use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::message::{content_length, read_body, read_head, HttpError};

/// Talks to a server on a Unix socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Option<Duration>,
}

/// A complete response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

impl ClientResponse {
    /// The body as text (lossy), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request failed before a response arrived.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the request to {} failed", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bad response from {}", path.display())]
    Response {
        path: PathBuf,
        #[source]
        source: HttpError,
    },
}

impl Client {
    /// A client of the server listening on `socket`; `timeout` bounds each read and write.
    pub fn new(socket: impl Into<PathBuf>, timeout: Option<Duration>) -> Self {
        Client {
            socket: socket.into(),
            timeout,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends a request and reads the whole response.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ClientResponse, ClientError> {
        let (status, mut reader, len) = self.send(method, path, body)?;
        let body = read_body(&mut reader, len).map_err(|source| self.bad(source))?;
        Ok(ClientResponse { status, body })
    }

    /// Sends a request and returns the status and the connection positioned at the body, for
    /// responses that stream (read until the server closes).
    pub fn stream(
        &self,
        method: &str,
        path: &str,
    ) -> Result<(u16, BufReader<UnixStream>), ClientError> {
        let (status, reader, _) = self.send(method, path, None)?;
        Ok((status, reader))
    }

    fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, BufReader<UnixStream>, usize), ClientError> {
        let stream = UnixStream::connect(&self.socket).map_err(|source| ClientError::Connect {
            path: self.socket.clone(),
            source,
        })?;
        let io_err = |source| ClientError::Io {
            path: self.socket.clone(),
            source,
        };
        stream.set_read_timeout(self.timeout).map_err(io_err)?;
        stream.set_write_timeout(self.timeout).map_err(io_err)?;
        let body = body.unwrap_or_default();
        let mut message = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            message.push_str("Content-Type: application/json\r\n");
        }
        message.push_str("\r\n");
        let mut message = message.into_bytes();
        message.extend_from_slice(body);
        (&stream).write_all(&message).map_err(io_err)?;
        let mut reader = BufReader::new(stream);
        let head = read_head(&mut reader)
            .map_err(|source| self.bad(source))?
            .ok_or_else(|| self.bad(HttpError::Truncated))?;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(_)) => {}
            Ok(httparse::Status::Partial) => {
                return Err(self.bad(HttpError::Malformed("incomplete".into())))
            }
            Err(e) => return Err(self.bad(HttpError::Malformed(e.to_string()))),
        }
        let status = response
            .code
            .ok_or_else(|| self.bad(HttpError::Malformed("no status".into())))?;
        let len = content_length(response.headers).map_err(|source| self.bad(source))?;
        Ok((status, reader, len))
    }

    fn bad(&self, source: HttpError) -> ClientError {
        ClientError::Response {
            path: self.socket.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{read_request, write_response, Response};
    use std::os::unix::net::UnixListener;

    #[test]
    fn a_round_trip_through_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let request = read_request(&mut reader).unwrap().unwrap();
            assert!(!request.keep_alive);
            let body = [request.path.as_bytes(), &request.body].concat();
            write_response(&mut &stream, &Response::json(200, body), false).unwrap();
        });
        let client = Client::new(&path, Some(Duration::from_secs(5)));
        let response = client.request("PUT", "/x", Some(b"{}")).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.text(), "/x{}");
        server.join().unwrap();
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let client = Client::new("/nonexistent/ferro.sock", None);
        let err = client.request("GET", "/", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
