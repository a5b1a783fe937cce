//! Server side: reading requests and writing responses on a connection.

use std::io::{self, BufRead, Write};

use crate::{MAX_BODY, MAX_HEAD};

const MAX_HEADERS: usize = 64;

/// Request methods the APIs use; anything else is kept by name so it can be refused with 405.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
    Other(String),
}

impl Method {
    fn parse(name: &str) -> Self {
        match name {
            "GET" => Method::Get,
            "PUT" => Method::Put,
            "POST" => Method::Post,
            "DELETE" => Method::Delete,
            other => Method::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
            Method::Other(name) => name,
        }
    }
}

/// One parsed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    /// The path without its query string.
    pub path: String,
    /// What followed `?`, if anything.
    pub query: Option<String>,
    pub body: Vec<u8>,
    /// The client asked to keep the connection open (HTTP/1.1 default).
    pub keep_alive: bool,
}

/// A response to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: Option<&'static str>,
    pub body: Vec<u8>,
}

impl Response {
    /// A JSON body.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Response {
            status,
            content_type: Some("application/json"),
            body,
        }
    }

    /// No body (204 and friends).
    pub fn empty(status: u16) -> Self {
        Response {
            status,
            content_type: None,
            body: Vec::new(),
        }
    }
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the connection failed")]
    Io(#[source] io::Error),
    #[error("the peer closed the connection in the middle of a request")]
    Truncated,
    #[error("the request head is larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("the request body is larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    #[error("chunked request bodies are not supported; send Content-Length")]
    LengthRequired,
    #[error("the message did not arrive in time")]
    TimedOut,
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::TimedOut => HttpError::TimedOut,
            io::ErrorKind::UnexpectedEof => HttpError::Truncated,
            _ => HttpError::Io(e),
        }
    }
}

impl HttpError {
    /// The status to answer with, or `None` when the connection is unusable.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Io(_) | HttpError::Truncated => None,
            HttpError::HeadTooLarge => Some(431),
            HttpError::Malformed(_) => Some(400),
            HttpError::BodyTooLarge => Some(413),
            HttpError::LengthRequired => Some(411),
            HttpError::TimedOut => Some(408),
        }
    }
}

/// Reads bytes up to and including the blank line that ends a message head. `Ok(None)` when
/// the peer closed the connection before sending anything.
pub(crate) fn read_head(reader: &mut impl BufRead) -> Result<Option<Vec<u8>>, HttpError> {
    let mut head = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if available.is_empty() {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(HttpError::Truncated)
            };
        }
        // Only the new bytes plus the last three old ones can complete "\r\n\r\n".
        let search_from = head.len().saturating_sub(3);
        let take = available.len().min(MAX_HEAD + 1 - head.len());
        head.extend_from_slice(&available[..take]);
        if let Some(end) = find_blank_line(&head[search_from..]) {
            let end = search_from + end;
            let consumed = take - (head.len() - end);
            reader.consume(consumed);
            head.truncate(end);
            return Ok(Some(head));
        }
        reader.consume(take);
        if head.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
}

/// Reads exactly `len` body bytes.
pub(crate) fn read_body(reader: &mut impl BufRead, len: usize) -> Result<Vec<u8>, HttpError> {
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// The value of header `name` (case-insensitive), if present and UTF-8.
fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
}

/// The body length a message announces; chunked bodies are refused.
pub(crate) fn content_length(headers: &[httparse::Header<'_>]) -> Result<usize, HttpError> {
    if header(headers, "transfer-encoding").is_some() {
        return Err(HttpError::LengthRequired);
    }
    let len = announced_length(headers)?;
    if len > MAX_BODY as u64 {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(len as usize)
}

/// The Content-Length of a message (0 when absent), without a limit: for bodies that are
/// streamed rather than held in memory.
pub(crate) fn announced_length(headers: &[httparse::Header<'_>]) -> Result<u64, HttpError> {
    let Some(value) = header(headers, "content-length") else {
        return Ok(0);
    };
    value
        .parse()
        .map_err(|_| HttpError::Malformed(format!("bad Content-Length {value:?}")))
}

/// Reads the next request on a connection; `Ok(None)` once the client has closed it.
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<Request>, HttpError> {
    let Some(head) = read_head(reader)? else {
        return Ok(None);
    };
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HttpError::Malformed("incomplete".into())),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::Malformed("incomplete request line".into()));
    };
    let len = content_length(parsed.headers)?;
    let connection = header(parsed.headers, "connection").map(str::to_ascii_lowercase);
    let keep_alive = match connection.as_deref() {
        Some("close") => false,
        Some("keep-alive") => true,
        _ => version == 1,
    };
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (target.to_string(), None),
    };
    let method = Method::parse(method);
    let body = read_body(reader, len)?;
    Ok(Some(Request {
        method,
        path,
        query,
        body,
        keep_alive,
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "",
    }
}

/// Writes `response`; `keep_alive` says whether the connection stays open after it.
pub fn write_response(
    writer: &mut impl Write,
    response: &Response,
    keep_alive: bool,
) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    if let Some(content_type) = response.content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n", response.body.len()));
    head.push_str(if keep_alive {
        "Connection: keep-alive\r\n\r\n"
    } else {
        "Connection: close\r\n\r\n"
    });
    let mut message = head.into_bytes();
    message.extend_from_slice(&response.body);
    writer.write_all(&message)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn parse(raw: &[u8]) -> Result<Option<Request>, HttpError> {
        read_request(&mut BufReader::new(raw))
    }

    #[test]
    fn a_request_with_a_body_and_a_query() {
        let raw = b"PUT /api/v1/vm/pause?now=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}";
        let request = parse(raw).unwrap().unwrap();
        assert_eq!(request.method, Method::Put);
        assert_eq!(request.path, "/api/v1/vm/pause");
        assert_eq!(request.query.as_deref(), Some("now=1"));
        assert_eq!(request.body, b"{}");
        assert!(request.keep_alive);
    }

    #[test]
    fn two_requests_on_one_connection() {
        let raw = b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.0\r\n\r\n";
        let mut reader = BufReader::with_capacity(7, &raw[..]);
        assert_eq!(read_request(&mut reader).unwrap().unwrap().path, "/a");
        let second = read_request(&mut reader).unwrap().unwrap();
        assert_eq!(second.path, "/b");
        assert!(!second.keep_alive, "HTTP/1.0 closes by default");
        assert!(read_request(&mut reader).unwrap().is_none());
    }

    #[test]
    fn bad_requests_get_the_status_the_rfc_gives() {
        let cases: [(&[u8], Option<u16>); 6] = [
            (b"GARBAGE\r\n\r\n", Some(400)),
            (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", Some(400)),
            (
                b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                Some(413),
            ),
            (
                b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                Some(411),
            ),
            (b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", None),
            (b"GET / HTTP/1.1\r\nHost", None),
        ];
        for (raw, status) in cases {
            let err = parse(raw).unwrap_err();
            assert_eq!(err.status(), status, "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn an_endless_head_is_refused_without_reading_it_all() {
        let mut raw = b"GET / HTTP/1.1\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 10 * MAX_HEAD));
        assert_eq!(parse(&raw).unwrap_err().status(), Some(431));
    }

    #[test]
    fn responses_carry_length_and_connection() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            &Response::json(409, b"{\"error\":\"x\"}".to_vec()),
            false,
        )
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 409 Conflict\r\n"), "{text}");
        assert!(text.contains("Content-Length: 13\r\n"));
        assert!(text.contains("Connection: close\r\n\r\n{\"error\":\"x\"}"));
    }
}
