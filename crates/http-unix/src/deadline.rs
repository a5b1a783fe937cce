//! Reading under one deadline: every read of a request, however many it takes, must be done by
//! the same instant. A per-read timeout (`set_read_timeout` alone) restarts with each byte, so
//! a peer sending one byte a second would hold the connection for ever; here each read gets
//! only the time left.

use std::cell::Cell;
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::Instant;

/// A Unix stream whose reads end at a deadline ([`io::ErrorKind::TimedOut`] after it).
#[derive(Debug)]
pub struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Cell<Option<Instant>>,
}

impl<'a> DeadlineReader<'a> {
    /// Reads without a deadline until [`DeadlineReader::set_deadline`].
    pub fn new(stream: &'a UnixStream) -> Self {
        DeadlineReader {
            stream,
            deadline: Cell::new(None),
        }
    }

    /// Reads from now on must be done by `deadline` (e.g. before each request).
    pub fn set_deadline(&self, deadline: Instant) {
        self.deadline.set(Some(deadline));
    }
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the deadline passed")
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline.get() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(timed_out());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        match (&mut &*self.stream).read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(timed_out())
            }
            result => result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Write};
    use std::time::Duration;

    /// A peer that sends a byte every 50 ms never waits long enough for a per-read timeout of
    /// 200 ms, but the request's deadline of 500 ms ends it.
    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let (server, mut client) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..40 {
                if client.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let reader = DeadlineReader::new(&server);
        reader.set_deadline(start + Duration::from_millis(500));
        let mut reader = BufReader::new(reader);
        let error = crate::read_request(&mut reader).unwrap_err();
        let took = start.elapsed();
        assert!(matches!(error, crate::HttpError::TimedOut), "{error:?}");
        assert_eq!(error.status(), Some(408));
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_millis(900),
            "{took:?}"
        );
        drop(reader);
        drop(server);
        writer.join().unwrap();
    }

    #[test]
    fn a_prompt_request_is_read_whole() {
        let (server, mut client) = UnixStream::pair().unwrap();
        client
            .write_all(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        let reader = DeadlineReader::new(&server);
        reader.set_deadline(Instant::now() + Duration::from_secs(5));
        let request = crate::read_request(&mut BufReader::new(reader))
            .unwrap()
            .unwrap();
        assert_eq!(
            (request.path.as_str(), request.body.as_slice()),
            ("/a", &b"{}"[..])
        );
    }
}
