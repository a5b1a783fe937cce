//! Client side: one request per connection (`Connection: close`).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::message::{announced_length, read_body, read_head, HttpError};

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

/// A response's status line and headers, read; the body is next on `reader`.
struct Head {
    status: u16,
    reader: BufReader<UnixStream>,
    len: u64,
    chunked: bool,
}

/// A response body as it arrives: chunked transfer coding is undone; otherwise bytes until
/// the server closes the connection.
#[derive(Debug)]
pub struct BodyReader {
    inner: BufReader<UnixStream>,
    chunked: bool,
    /// Bytes left in the current chunk.
    remaining: u64,
    done: bool,
}

impl BodyReader {
    fn new(inner: BufReader<UnixStream>, chunked: bool) -> Self {
        BodyReader {
            inner,
            chunked,
            remaining: 0,
            done: false,
        }
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        (&mut self.inner).take(1024).read_line(&mut line)?;
        if !line.ends_with('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad chunk framing",
            ));
        }
        Ok(line.trim_end().to_string())
    }

    /// Reads the next chunk-size line; false at the last chunk.
    fn next_chunk(&mut self) -> io::Result<bool> {
        let line = self.line()?;
        let size = line.split(';').next().unwrap_or("").trim();
        self.remaining = u64::from_str_radix(size, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if self.remaining == 0 {
            while !self.line()?.is_empty() {} // trailers
            return Ok(false);
        }
        Ok(true)
    }
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.chunked {
            return self.inner.read(buf);
        }
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.remaining == 0 && !self.next_chunk()? {
            self.done = true;
            return Ok(0);
        }
        let want = buf.len().min(self.remaining as usize);
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            self.line()?; // the CRLF after the chunk
        }
        Ok(n)
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
        let head = self.send(method, path, body)?;
        let status = head.status;
        let body = if head.chunked {
            let mut body = Vec::new();
            BodyReader::new(head.reader, true)
                .take(crate::MAX_BODY as u64 + 1)
                .read_to_end(&mut body)
                .map_err(|source| self.bad(HttpError::Io(source)))?;
            if body.len() > crate::MAX_BODY {
                return Err(self.bad(HttpError::BodyTooLarge));
            }
            body
        } else {
            let mut reader = head.reader;
            let len = self.limited(head.len)?;
            read_body(&mut reader, len).map_err(|source| self.bad(source))?
        };
        Ok(ClientResponse { status, body })
    }

    /// Sends a request and returns the status and a reader of the body as it arrives, for
    /// responses that stream (chunked, or until the server closes).
    pub fn stream(&self, method: &str, path: &str) -> Result<(u16, BodyReader), ClientError> {
        let head = self.send(method, path, None)?;
        Ok((head.status, BodyReader::new(head.reader, head.chunked)))
    }

    fn send(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Head, ClientError> {
        let body = body.unwrap_or_default();
        let content_type = (!body.is_empty()).then_some("application/json");
        self.send_body(
            method,
            path,
            content_type,
            body.len() as u64,
            &mut |stream| stream.write_all(body),
        )
    }

    /// Sends a request whose `len`-byte body comes from `reader` (copied in 64 KiB pieces,
    /// `progress` told the bytes sent so far) and reads the whole response.
    pub fn upload(
        &self,
        method: &str,
        path: &str,
        reader: &mut dyn Read,
        len: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<ClientResponse, ClientError> {
        let head = self.send_body(
            method,
            path,
            Some("application/octet-stream"),
            len,
            &mut |stream| {
                let mut buf = vec![0u8; 64 << 10];
                let mut sent = 0u64;
                while sent < len {
                    let want = buf.len().min((len - sent) as usize);
                    let n = reader.read(&mut buf[..want])?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    stream.write_all(&buf[..n])?;
                    sent += n as u64;
                    progress(sent);
                }
                Ok(())
            },
        )?;
        let status = head.status;
        let mut reader = head.reader;
        let len = self.limited(head.len)?;
        let body = read_body(&mut reader, len).map_err(|source| self.bad(source))?;
        Ok(ClientResponse { status, body })
    }

    /// Sends a request with a JSON body and returns the status and a reader of the streamed
    /// response body.
    pub fn stream_with_body(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<(u16, BodyReader), ClientError> {
        let head = self.send(method, path, Some(body))?;
        Ok((head.status, BodyReader::new(head.reader, head.chunked)))
    }

    /// Sends a request and returns the status, the body's length if announced, and a reader
    /// of the body (for downloads).
    pub fn download(
        &self,
        method: &str,
        path: &str,
    ) -> Result<(u16, Option<u64>, BodyReader), ClientError> {
        let head = self.send(method, path, None)?;
        let len = (!head.chunked).then_some(head.len);
        Ok((head.status, len, BodyReader::new(head.reader, head.chunked)))
    }

    fn send_body(
        &self,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        len: u64,
        write_body: &mut dyn FnMut(&mut UnixStream) -> io::Result<()>,
    ) -> Result<Head, ClientError> {
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
        let mut message = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {len}\r\n"
        );
        if let Some(content_type) = content_type {
            message.push_str(&format!("Content-Type: {content_type}\r\n"));
        }
        message.push_str("\r\n");
        let mut stream = stream;
        stream.write_all(message.as_bytes()).map_err(io_err)?;
        write_body(&mut stream).map_err(io_err)?;
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
        let chunked = response.headers.iter().any(|h| {
            h.name.eq_ignore_ascii_case("transfer-encoding")
                && String::from_utf8_lossy(h.value)
                    .to_ascii_lowercase()
                    .contains("chunked")
        });
        let len = if chunked {
            0
        } else {
            announced_length(response.headers).map_err(|source| self.bad(source))?
        };
        Ok(Head {
            status,
            reader,
            len,
            chunked,
        })
    }

    /// A body length that may be read into memory.
    fn limited(&self, len: u64) -> Result<usize, ClientError> {
        if len > crate::MAX_BODY as u64 {
            return Err(self.bad(HttpError::BodyTooLarge));
        }
        Ok(len as usize)
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
    fn chunked_bodies_are_decoded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                read_request(&mut reader).unwrap().unwrap();
                stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                          6\r\nhello \r\n5;x=y\r\nworld\r\n0\r\n\r\n",
                    )
                    .unwrap();
            }
        });
        let client = Client::new(&path, Some(Duration::from_secs(5)));
        assert_eq!(
            client.request("GET", "/", None).unwrap().text(),
            "hello world"
        );
        let (status, mut body) = client.stream("GET", "/").unwrap();
        let mut text = String::new();
        body.read_to_string(&mut text).unwrap();
        assert_eq!((status, text.as_str()), (200, "hello world"));
        server.join().unwrap();
    }

    #[test]
    fn no_server_is_a_connect_error() {
        let client = Client::new("/nonexistent/ferro.sock", None);
        let err = client.request("GET", "/", None).unwrap_err();
        assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    }
}
