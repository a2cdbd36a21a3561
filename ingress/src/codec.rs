//! HTTP/1.1 wire pieces of the request path that `httparse` leaves to us: the chunked transfer coding (checked
//! strictly, because a lenient chunk parser is how request smuggling gets through a proxy), request-target and
//! header-value checks, and the `Date` header.
//!
//! The chunked decoder never buffers: it walks the bytes it is given and says how many it consumed, so the
//! data path can forward exactly those bytes (pass-through keeps the sender's chunking) or only the data in them
//! (for an HTTP/1.0 client, which cannot receive chunked).

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

/// Why a chunked body is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The chunk-size line is not hex digits, optional extensions and CRLF.
    #[error("bad chunk size line")]
    Size,
    /// A chunk's data is not followed by CRLF.
    #[error("chunk data not followed by CRLF")]
    DataEnd,
    /// The chunk size does not fit in 64 bits.
    #[error("chunk size too large")]
    Overflow,
    /// The chunk-size line (with extensions) or the trailer section is too long.
    #[error("chunk size line or trailers too long")]
    TooLong,
    /// A trailer line is malformed (bare LF).
    #[error("bad trailer line")]
    Trailer,
}

/// The longest chunk-size line (with extensions) and the largest trailer section accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of the size; `digits` so far.
    Size { digits: u8 },
    /// In extensions after `;` (or whitespace), until CR.
    Ext,
    /// Got CR after the size line.
    SizeLf,
    /// In chunk data.
    Data,
    /// Expect CR after data.
    DataCr,
    /// Expect LF after data.
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    /// Inside a trailer line.
    TrailerLine,
    /// Got CR in a trailer line.
    TrailerLf,
    /// Got CR of the final empty line.
    EndLf,
    /// The body is complete.
    Done,
}

/// A streaming decoder of the chunked transfer coding (RFC 9112 §7.1), strict: CRLF only, hex sizes, bounded
/// line lengths.
#[derive(Debug, Clone)]
pub struct Chunked {
    state: State,
    /// Bytes left in the current chunk.
    left: u64,
    /// Size of the chunk being read.
    size: u64,
    /// Length of the current size line or trailer section.
    line: usize,
    /// Data bytes seen so far (for body limits).
    pub data_len: u64,
}

impl Default for Chunked {
    fn default() -> Self {
        Chunked { state: State::Size { digits: 0 }, left: 0, size: 0, line: 0, data_len: 0 }
    }
}

fn hex(b: u8) -> Option<u64> {
    match b {
        b'0'..=b'9' => Some(u64::from(b - b'0')),
        b'a'..=b'f' => Some(u64::from(b - b'a' + 10)),
        b'A'..=b'F' => Some(u64::from(b - b'A' + 10)),
        _ => None,
    }
}

impl Chunked {
    /// Whether the final chunk and the trailers have been read.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Walks `input`, calling `data` with each run of chunk data, and returns how many bytes were consumed (all
    /// of them unless the body ends inside `input`: then up to and including its final CRLF).
    pub fn feed(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, ChunkError> {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => return Ok(i),
                State::Data => {
                    let n = (input.len() - i).min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    data(&input[i..i + n]);
                    self.data_len += n as u64;
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = State::DataCr;
                    }
                    continue;
                }
                State::Size { digits } => {
                    self.line += 1;
                    if let Some(v) = hex(b) {
                        if digits >= 16 {
                            return Err(ChunkError::Overflow);
                        }
                        self.size =
                            self.size.checked_mul(16).and_then(|s| s.checked_add(v)).ok_or(ChunkError::Overflow)?;
                        self.state = State::Size { digits: digits + 1 };
                    } else if digits == 0 {
                        return Err(ChunkError::Size);
                    } else if b == b'\r' {
                        self.state = State::SizeLf;
                    } else if b == b';' || b == b' ' || b == b'\t' {
                        self.state = State::Ext;
                    } else {
                        return Err(ChunkError::Size);
                    }
                }
                State::Ext => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(ChunkError::TooLong);
                    }
                    match b {
                        b'\r' => self.state = State::SizeLf,
                        b'\n' => return Err(ChunkError::Size),
                        _ if b < 0x20 && b != b'\t' || b == 0x7f => return Err(ChunkError::Size),
                        _ => {}
                    }
                }
                State::SizeLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Size);
                    }
                    self.line = 0;
                    if self.size == 0 {
                        self.state = State::TrailerStart;
                    } else {
                        self.left = self.size;
                        self.size = 0;
                        self.state = State::Data;
                    }
                }
                State::DataCr => {
                    if b != b'\r' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::DataLf;
                }
                State::DataLf => {
                    if b != b'\n' {
                        return Err(ChunkError::DataEnd);
                    }
                    self.state = State::Size { digits: 0 };
                }
                State::TrailerStart => {
                    self.line += 1;
                    match b {
                        b'\r' => self.state = State::EndLf,
                        b'\n' => return Err(ChunkError::Trailer),
                        _ => self.state = State::TrailerLine,
                    }
                }
                State::TrailerLine => {
                    self.line += 1;
                    if self.line > MAX_LINE {
                        return Err(ChunkError::TooLong);
                    }
                    match b {
                        b'\r' => self.state = State::TrailerLf,
                        b'\n' => return Err(ChunkError::Trailer),
                        _ => {}
                    }
                }
                State::TrailerLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Trailer);
                    }
                    self.state = State::TrailerStart;
                }
                State::EndLf => {
                    if b != b'\n' {
                        return Err(ChunkError::Trailer);
                    }
                    self.state = State::Done;
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

/// What a request-target is (RFC 9112 §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// `/path?query`.
    Origin {
        /// The path.
        path: &'a str,
        /// The query, without `?`.
        query: Option<&'a str>,
    },
    /// `http://authority/path?query`: the authority replaces `Host`.
    Absolute {
        /// The authority.
        authority: &'a str,
        /// The path (`/` when the target has none).
        path: &'a str,
        /// The query, without `?`.
        query: Option<&'a str>,
    },
    /// `*` (with OPTIONS only).
    Asterisk,
}

/// Why a request-target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// A byte that has no business in a request-target (controls, space, non-ASCII, `#`).
    #[error("the request target holds a byte that must be percent-encoded")]
    Byte,
    /// Neither origin-form, absolute-form nor `OPTIONS *`.
    #[error("the request target is not /path, http(s)://authority/path, or * (with OPTIONS)")]
    Form,
    /// The authority of an absolute-form target is empty, carries userinfo or bad bytes.
    #[error("the request target's authority is not host[:port]")]
    Authority,
}

fn split_query(pq: &str) -> (&str, Option<&str>) {
    match pq.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (pq, None),
    }
}

/// Classifies and checks a request-target. `options` is whether the method is OPTIONS.
pub fn target(raw: &str, options: bool) -> Result<Target<'_>, TargetError> {
    if !raw.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'#') {
        return Err(TargetError::Byte);
    }
    if raw.starts_with('/') {
        let (path, query) = split_query(raw);
        return Ok(Target::Origin { path, query });
    }
    if raw == "*" {
        return if options { Ok(Target::Asterisk) } else { Err(TargetError::Form) };
    }
    let lower_scheme = |s: &str| raw.len() >= s.len() && raw[..s.len()].eq_ignore_ascii_case(s);
    let rest = if lower_scheme("http://") {
        &raw[7..]
    } else if lower_scheme("https://") {
        &raw[8..]
    } else {
        return Err(TargetError::Form);
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..end];
    if !valid_authority(authority) || authority.is_empty() {
        return Err(TargetError::Authority);
    }
    let (path, query) = split_query(&rest[end..]);
    let path = if path.is_empty() { "/" } else { path };
    Ok(Target::Absolute { authority, path, query })
}

/// Whether a `Host` value (or an absolute-form authority) is `host[:port]` without userinfo or stray bytes. An
/// empty value is allowed (RFC 9112 §3.2: a target without authority sends an empty Host).
pub fn valid_authority(a: &str) -> bool {
    a.bytes().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b'%' | b':' | b'[' | b']' | b'!' | b'$' | b'&' | b'\'')
            || matches!(b, b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=')
    })
}

/// Comma-separated tokens of a header value, trimmed, empty ones skipped.
pub fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty())
}

/// A `Content-Length` value: one or more comma-separated copies of the same decimal number (RFC 9110 §8.6 lets a
/// recipient accept `5, 5` as 5); anything else is `None`.
pub fn content_length(v: &[u8]) -> Option<u64> {
    let mut out = None;
    for t in v.split(|b| *b == b',') {
        let t = t.trim_ascii();
        if t.is_empty() || t.len() > 19 || !t.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n: u64 = std::str::from_utf8(t).ok()?.parse().ok()?;
        match out {
            Some(prev) if prev != n => return None,
            _ => out = Some(n),
        }
    }
    out
}

thread_local! {
    static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
}

/// The current time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), formatted once a second per thread.
pub fn date(f: impl FnOnce(&[u8])) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != now {
            *d = (now, imf_fixdate(now));
        }
        f(&d.1);
    });
}

fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    let days = secs / 86400;
    let rem = secs % 86400;
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = [0u8; 29];
    out[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    let two = |n: i64| [b'0' + (n / 10 % 10) as u8, b'0' + (n % 10) as u8];
    out[3..5].copy_from_slice(b", ");
    out[5..7].copy_from_slice(&two(day));
    out[7] = b' ';
    out[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    out[11] = b' ';
    out[12..14].copy_from_slice(&two(year / 100));
    out[14..16].copy_from_slice(&two(year % 100));
    out[16] = b' ';
    out[17..19].copy_from_slice(&two(h as i64));
    out[19] = b':';
    out[20..22].copy_from_slice(&two(m as i64));
    out[22] = b':';
    out[23..25].copy_from_slice(&two(s as i64));
    out[25..29].copy_from_slice(b" GMT");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(input: &[u8]) -> Result<(usize, Vec<u8>, bool), ChunkError> {
        let mut c = Chunked::default();
        let mut out = Vec::new();
        let n = c.feed(input, |d| out.extend_from_slice(d))?;
        Ok((n, out, c.done()))
    }

    #[test]
    fn chunked_bodies_decode_and_stop_at_their_end() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n";
        let (n, data, done) = decode(body).unwrap();
        assert!(done);
        assert_eq!(data, b"Wikipedia");
        assert_eq!(&body[n..], b"GET / HTTP/1.1\r\n", "the next request is left alone");
        // Fed one byte at a time, the same.
        let mut c = Chunked::default();
        let mut out = Vec::new();
        for b in &body[..n] {
            assert_eq!(c.feed(std::slice::from_ref(b), |d| out.extend_from_slice(d)).unwrap(), 1);
        }
        assert!(c.done());
        assert_eq!(out, b"Wikipedia");
        assert_eq!(c.data_len, 9);
    }

    #[test]
    fn bad_chunking_is_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"4\nWiki\r\n0\r\n\r\n",
            b"4\r\nWikiX\r\n",
            b"-1\r\n",
            b"11111111111111111\r\n",
            b"4\r\nWiki\r\n0\r\n\n",
            b"4\r\nWiki\r\n0\r\nX: 1\n\r\n",
            b" 4\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(!decode(b"ffffffffffffffff\r\n").unwrap().2, "the largest size is a size");
    }

    #[test]
    fn targets() {
        assert_eq!(target("/a?b=c", false), Ok(Target::Origin { path: "/a", query: Some("b=c") }));
        assert_eq!(
            target("http://Foo.com:80/x?y", false),
            Ok(Target::Absolute { authority: "Foo.com:80", path: "/x", query: Some("y") })
        );
        assert_eq!(
            target("https://foo.com?q", false),
            Ok(Target::Absolute { authority: "foo.com", path: "/", query: Some("q") })
        );
        assert_eq!(target("*", true), Ok(Target::Asterisk));
        assert_eq!(target("*", false), Err(TargetError::Form));
        assert_eq!(target("foo", false), Err(TargetError::Form));
        assert_eq!(target("/a\0b", false), Err(TargetError::Byte));
        assert_eq!(target("/a b", false), Err(TargetError::Byte));
        assert_eq!(target("/a#frag", false), Err(TargetError::Byte));
        assert_eq!(target("/caf\u{e9}", false), Err(TargetError::Byte));
        assert_eq!(target("http://user@host/", false), Err(TargetError::Authority));
        assert_eq!(target("http:///x", false), Err(TargetError::Authority));
    }

    #[test]
    fn content_lengths() {
        assert_eq!(content_length(b"5"), Some(5));
        assert_eq!(content_length(b"5, 5"), Some(5));
        assert_eq!(content_length(b"5, 6"), None);
        assert_eq!(content_length(b"+5"), None);
        assert_eq!(content_length(b""), None);
        assert_eq!(content_length(b"99999999999999999999"), None);
    }

    #[test]
    fn dates() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(1_709_210_096), b"Thu, 29 Feb 2024 12:34:56 GMT");
    }
}
