//! Request-path normalisation, so that `/a/%62`, `/a/./b/../b`, `/a//b` and `/a/b` all match a rule for `/a/b`;
//! and the normalised path is what goes upstream, so the route chosen and the resource the backend serves can
//! never differ (`/api/../secret` is routed *and* forwarded as `/secret`), as Envoy's `normalize_path` +
//! `merge_slashes` do.
//!
//! What is done (RFC 3986 §6.2.2): percent-encoded *unreserved* characters are decoded (`%7E` → `~`), other
//! escapes keep their encoding with upper-case hex (`%2f` → `%2F`, so an encoded slash never becomes a path
//! separator), repeated slashes are merged (`//a///b` → `/a/b`), and `.`/`..` segments are removed without ever
//! climbing above the root (`/../etc` → `/etc`). Not done: case folding (paths are case-sensitive in the Ingress
//! API). The query string is not touched.

use std::borrow::Cow;

/// Whether a byte is RFC 3986 "unreserved" (safe to decode: it means the same encoded or not).
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The path to match routes against. Borrows when nothing needs changing (the common case).
pub fn normalize(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let needs_decode = bytes.contains(&b'%');
    let needs_dots = path.contains("/.") || path.contains("//");
    if !needs_decode && !needs_dots && path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let decoded: Cow<'_, str> = if needs_decode { Cow::Owned(decode_unreserved(bytes)) } else { Cow::Borrowed(path) };
    Cow::Owned(remove_dot_segments(&decoded))
}

fn decode_unreserved(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            let v = h * 16 + l;
            if unreserved(v) {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(bytes[i + 1].to_ascii_uppercase()));
                out.push(char::from(bytes[i + 2].to_ascii_uppercase()));
            }
            i += 3;
            continue;
        }
        // A path from a parsed URI is ASCII; anything else is kept byte for byte (lossy only for invalid UTF-8,
        // which cannot come from `http::Uri`).
        out.push(char::from(b));
        i += 1;
    }
    out
}

/// RFC 3986 §5.2.4 on an absolute path; `..` at the root stays at the root.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let rest = path.strip_prefix('/').unwrap_or(path);
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            // Repeated slashes merge; an empty last segment is the trailing slash.
            "" if i != last => {}
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_are_borrowed() {
        assert!(matches!(normalize("/foo/bar"), Cow::Borrowed("/foo/bar")));
        assert!(matches!(normalize("/"), Cow::Borrowed("/")));
    }

    #[test]
    fn unreserved_escapes_are_decoded_others_kept() {
        assert_eq!(normalize("/a/%62%7e"), "/a/b~");
        assert_eq!(normalize("/a%2fb"), "/a%2Fb", "an encoded slash stays encoded: not a separator");
        assert_eq!(normalize("/a%20b"), "/a%20b");
        assert_eq!(normalize("/bad%zz"), "/bad%zz");
        assert_eq!(normalize("/trunc%4"), "/trunc%4");
    }

    #[test]
    fn dot_segments_never_escape_the_root() {
        assert_eq!(normalize("/a/./b/../c"), "/a/c");
        assert_eq!(normalize("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(normalize("/a/%2e%2e/b"), "/b", "encoded dots are unreserved, so decoded first");
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/a/."), "/a/");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(normalize("/a/.hidden"), "/a/.hidden");
    }

    #[test]
    fn repeated_slashes_merge_and_a_trailing_slash_stays() {
        assert_eq!(normalize("//a///b"), "/a/b");
        assert_eq!(normalize("/a//"), "/a/");
        assert_eq!(normalize("//"), "/");
        assert_eq!(normalize("/api/..//secret"), "/secret");
    }
}
