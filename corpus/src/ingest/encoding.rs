//! From a file's bytes to text, in the encoding the file declares, the way a browser finds it
//! (the WHATWG Encoding Standard and the HTML Standard's encoding sniffing).
//!
//! In order, the first that applies wins:
//! 1. a byte order mark (UTF-8, UTF-16LE, UTF-16BE), in any format; it is removed, never text;
//! 2. for HTML, a `<meta charset>` or `<meta http-equiv="content-type" content="...charset=">`
//!    in the first 1024 bytes (the HTML Standard's *prescan*), or an XML declaration's
//!    `encoding="..."`;
//! 3. the source's `encoding:` from the job file, else UTF-8.
//!
//! Labels map to encodings as the Encoding Standard says (so `iso-8859-1` and `latin1` decode as
//! windows-1252, as every browser does). The decoding itself is `encoding_rs`, Firefox's
//! implementation. Bytes that are not valid in the chosen encoding become U+FFFD and the file
//! is counted as decoded lossily; nothing is dropped silently.

use encoding_rs::{Encoding, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

use super::Format;

/// How many leading bytes of an HTML file the prescan reads, as the HTML Standard advises.
pub const PRESCAN_BYTES: usize = 1024;

/// Where the encoding of a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// A byte order mark at the start of the file.
    Bom,
    /// An HTML `<meta>` (or XML declaration) in the first [`PRESCAN_BYTES`] bytes.
    Meta,
    /// Nothing in the file: the source's configured encoding, or UTF-8.
    Fallback,
}

/// A file's text and how it was decoded.
#[derive(Debug)]
pub struct Decoded {
    /// The text, without the byte order mark.
    pub text: String,
    pub encoding: &'static Encoding,
    pub declared: Declared,
    /// Some bytes were not valid in `encoding` and became U+FFFD.
    pub lossy: bool,
}

/// Decodes `raw` (a whole file, decompressed) of `format`; `fallback` is the encoding of a file
/// that declares none (UTF-8 unless the job says otherwise).
pub fn decode(raw: Vec<u8>, format: Format, fallback: &'static Encoding) -> Decoded {
    let (encoding, declared, skip) = if let Some((enc, bom)) = Encoding::for_bom(&raw) {
        (enc, Declared::Bom, bom)
    } else if let Some(enc) = (format == Format::Html)
        .then(|| prescan(&raw[..raw.len().min(PRESCAN_BYTES)]))
        .flatten()
    {
        (enc, Declared::Meta, 0)
    } else {
        (fallback, Declared::Fallback, 0)
    };
    let (text, lossy) = if encoding == UTF_8 {
        // The common case: valid UTF-8 is taken as it is, without a copy.
        let mut raw = raw;
        raw.drain(..skip);
        match String::from_utf8(raw) {
            Ok(text) => (text, false),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
        }
    } else {
        let (text, lossy) = encoding.decode_without_bom_handling(&raw[skip..]);
        (text.into_owned(), lossy)
    };
    Decoded {
        text,
        encoding,
        declared,
        lossy,
    }
}

/// The encoding that a `<meta>` in `bytes` declares, by the HTML Standard's "prescan a byte
/// stream to determine its encoding" (with its "get an attribute" and "extracting a character
/// encoding from a meta element"), or else an XML declaration's. Only `bytes` are read: a
/// construct cut off at their end declares nothing. UTF-16 declared inside the page itself
/// means UTF-8 (the page could not have been read as ASCII otherwise), as the standard says.
pub fn prescan(bytes: &[u8]) -> Option<&'static Encoding> {
    let found = meta_scan(bytes).or_else(|| xml_declaration(bytes))?;
    Some(if found == UTF_16LE || found == UTF_16BE {
        UTF_8
    } else if found == X_USER_DEFINED {
        WINDOWS_1252
    } else {
        found
    })
}

fn is_space(b: u8) -> bool {
    matches!(b, 0x09 | 0x0A | 0x0C | 0x0D | 0x20)
}

fn starts_with_ignore_case(bytes: &[u8], at: usize, prefix: &[u8]) -> bool {
    bytes
        .get(at..at + prefix.len())
        .is_some_and(|s| s.eq_ignore_ascii_case(prefix))
}

fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i)
}

/// The prescan proper: `None` when it runs out of bytes without a declaration.
fn meta_scan(b: &[u8]) -> Option<&'static Encoding> {
    let mut pos = 0;
    while pos < b.len() {
        if b[pos..].starts_with(b"<!--") {
            // To the `>` of the first `-->` after the `<` (`<!-->` closes itself).
            pos = find(b, pos + 2, b"-->")? + 2;
        } else if starts_with_ignore_case(b, pos, b"<meta")
            && b.get(pos + 5).is_some_and(|&c| is_space(c) || c == b'/')
        {
            pos += 6;
            if let Some(found) = meta_element(b, &mut pos)? {
                return Some(found);
            }
        } else if b[pos] == b'<'
            && (b.get(pos + 1).is_some_and(u8::is_ascii_alphabetic)
                || (b.get(pos + 1) == Some(&b'/')
                    && b.get(pos + 2).is_some_and(u8::is_ascii_alphabetic)))
        {
            // Another tag: skip its name and its attributes (a `>` inside a quoted value
            // does not end it).
            while !b.get(pos).is_some_and(|&c| is_space(c) || c == b'>') {
                pos += 1;
                b.get(pos)?;
            }
            while attribute(b, &mut pos)?.is_some() {}
        } else if b[pos..].starts_with(b"<!")
            || b[pos..].starts_with(b"</")
            || b[pos..].starts_with(b"<?")
        {
            pos = find(b, pos + 1, b">")?;
        }
        pos += 1;
    }
    None
}

/// The attributes of one `<meta ...>`: `Some(Some(encoding))` when it declares one,
/// `Some(None)` when it does not, `None` when the bytes end inside it.
fn meta_element(b: &[u8], pos: &mut usize) -> Option<Option<&'static Encoding>> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut got_pragma = false;
    let mut need_pragma: Option<bool> = None;
    let mut charset: Option<&'static Encoding> = None;
    while let Some((name, value)) = attribute(b, pos)? {
        if seen.contains(&name) {
            continue;
        }
        match name.as_slice() {
            b"http-equiv" => got_pragma |= value == b"content-type",
            b"content" if charset.is_none() => {
                if let Some(found) = charset_from_content(&value) {
                    charset = Some(found);
                    need_pragma = Some(true);
                }
            }
            b"charset" => {
                charset = Encoding::for_label(&value);
                need_pragma = Some(false);
            }
            _ => {}
        }
        seen.push(name);
    }
    Some(match need_pragma {
        None => None,
        Some(true) if !got_pragma => None,
        _ => charset,
    })
}

/// An attribute's name and value, ASCII-lowercased.
type Attribute = (Vec<u8>, Vec<u8>);

/// The HTML Standard's "get an attribute": `Some(None)` at the tag's end, `None` when the
/// bytes run out.
fn attribute(b: &[u8], pos: &mut usize) -> Option<Option<Attribute>> {
    while is_space(*b.get(*pos)?) || b[*pos] == b'/' {
        *pos += 1;
    }
    if b[*pos] == b'>' {
        return Some(None);
    }
    let mut name = Vec::new();
    let mut value = Vec::new();
    // The name.
    loop {
        let c = *b.get(*pos)?;
        if c == b'=' && !name.is_empty() {
            *pos += 1;
            break;
        }
        if is_space(c) {
            while is_space(*b.get(*pos)?) {
                *pos += 1;
            }
            if b[*pos] != b'=' {
                return Some(Some((name, value)));
            }
            *pos += 1;
            break;
        }
        if c == b'/' || c == b'>' {
            return Some(Some((name, value)));
        }
        name.push(c.to_ascii_lowercase());
        *pos += 1;
    }
    // The value.
    while is_space(*b.get(*pos)?) {
        *pos += 1;
    }
    let c = b[*pos];
    if c == b'"' || c == b'\'' {
        loop {
            *pos += 1;
            let d = *b.get(*pos)?;
            if d == c {
                *pos += 1;
                return Some(Some((name, value)));
            }
            value.push(d.to_ascii_lowercase());
        }
    }
    if c == b'>' {
        return Some(Some((name, value)));
    }
    loop {
        let d = *b.get(*pos)?;
        if is_space(d) || d == b'>' {
            return Some(Some((name, value)));
        }
        value.push(d.to_ascii_lowercase());
        *pos += 1;
    }
}

/// The HTML Standard's "extracting a character encoding from a meta element", on a
/// `content` value already lowercased (`text/html; charset=iso-8859-1`).
fn charset_from_content(s: &[u8]) -> Option<&'static Encoding> {
    let mut pos = 0;
    loop {
        pos = find(s, pos, b"charset")? + 7;
        while s.get(pos).is_some_and(|&c| is_space(c)) {
            pos += 1;
        }
        if s.get(pos) == Some(&b'=') {
            pos += 1;
            break;
        }
    }
    while s.get(pos).is_some_and(|&c| is_space(c)) {
        pos += 1;
    }
    match *s.get(pos)? {
        q @ (b'"' | b'\'') => {
            let end = find(s, pos + 1, &[q])?;
            Encoding::for_label(&s[pos + 1..end])
        }
        _ => {
            let end = s[pos..]
                .iter()
                .position(|&c| is_space(c) || c == b';')
                .map_or(s.len(), |i| pos + i);
            Encoding::for_label(&s[pos..end])
        }
    }
}

/// An XML declaration's encoding (`<?xml version="1.0" encoding="ISO-8859-1"?>`), for XHTML
/// files; the HTML Standard's "get an XML encoding".
fn xml_declaration(b: &[u8]) -> Option<&'static Encoding> {
    if !b.starts_with(b"<?xml") {
        return None;
    }
    let end = find(b, 5, b">")?;
    let decl = &b[..end];
    let mut pos = find(decl, 5, b"encoding")? + 8;
    while decl.get(pos).is_some_and(|&c| c <= 0x20) {
        pos += 1;
    }
    if decl.get(pos) != Some(&b'=') {
        return None;
    }
    pos += 1;
    while decl.get(pos).is_some_and(|&c| c <= 0x20) {
        pos += 1;
    }
    let quote = *decl.get(pos).filter(|&&q| q == b'"' || q == b'\'')?;
    let close = find(decl, pos + 1, &[quote])?;
    Encoding::for_label(&decl[pos + 1..close])
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{SHIFT_JIS, WINDOWS_1251};

    fn html(bytes: &[u8]) -> Decoded {
        decode(bytes.to_vec(), Format::Html, UTF_8)
    }

    #[test]
    fn boms_win_and_are_removed_in_every_format() {
        for format in [Format::Plain, Format::Jsonl, Format::Html] {
            let d = decode(b"\xEF\xBB\xBFhi".to_vec(), format, WINDOWS_1252);
            assert_eq!(
                (d.text.as_str(), d.declared, d.lossy),
                ("hi", Declared::Bom, false)
            );
            let mut bytes = vec![0xFF, 0xFE];
            bytes.extend("Größe".encode_utf16().flat_map(u16::to_le_bytes));
            let d = decode(bytes, format, UTF_8);
            assert_eq!((d.text.as_str(), d.encoding), ("Größe", UTF_16LE));
            let mut bytes = vec![0xFE, 0xFF];
            bytes.extend("Größe".encode_utf16().flat_map(u16::to_be_bytes));
            let d = decode(bytes, format, UTF_8);
            assert_eq!((d.text.as_str(), d.encoding), ("Größe", UTF_16BE));
        }
    }

    #[test]
    fn a_bom_beats_a_meta() {
        let d = html(b"\xEF\xBB\xBF<meta charset=iso-8859-1><p>\xC3\xA9");
        assert_eq!(d.encoding, UTF_8);
        assert!(d.text.ends_with('é'), "{}", d.text);
    }

    #[test]
    fn meta_charset_and_http_equiv() {
        assert_eq!(
            prescan(b"<meta charset=\"ISO-8859-1\">"),
            Some(WINDOWS_1252)
        );
        assert_eq!(prescan(b"<META CHARSET=shift_jis />"), Some(SHIFT_JIS));
        assert_eq!(
            prescan(
                b"<meta http-equiv=\"Content-Type\" content=\"text/html; charset=windows-1251\">"
            ),
            Some(WINDOWS_1251)
        );
        // content= without the pragma declares nothing
        assert_eq!(
            prescan(b"<meta content=\"text/html; charset=koi8-r\">"),
            None
        );
        // attributes in either order, quotes of either kind
        assert_eq!(
            prescan(b"<meta content='text/html;charset=\"windows-1251\"' http-equiv=content-type>"),
            Some(WINDOWS_1251)
        );
    }

    #[test]
    fn a_later_meta_counts_but_not_inside_comments_or_attributes() {
        let page = b"<!DOCTYPE html><html><head><title>x</title>\
            <meta name=viewport content=\"width=device-width\">\
            <meta charset=windows-1251></head>";
        assert_eq!(prescan(page), Some(WINDOWS_1251));
        assert_eq!(prescan(b"<!-- <meta charset=koi8-r> --><p>x"), None);
        assert_eq!(prescan(b"<a title='<meta charset=koi8-r>'>x</a>"), None);
        // cut off before the tag closes: nothing declared
        assert_eq!(prescan(b"<meta charset=koi8-r"), None);
    }

    #[test]
    fn utf16_declared_in_the_page_means_utf8_and_unknown_labels_are_ignored() {
        assert_eq!(prescan(b"<meta charset=utf-16le>"), Some(UTF_8));
        assert_eq!(
            prescan(b"<meta charset=x-user-defined>"),
            Some(WINDOWS_1252)
        );
        assert_eq!(prescan(b"<meta charset=no-such-thing>"), None);
    }

    #[test]
    fn xml_declaration_of_xhtml() {
        assert_eq!(
            prescan(b"<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?><html>"),
            Some(WINDOWS_1252)
        );
    }

    #[test]
    fn declared_latin1_decodes_as_windows_1252() {
        // 0x80 is the euro sign in windows-1252, which browsers use for "iso-8859-1".
        let d = html(b"<meta charset=\"iso-8859-1\"><p>Gr\xF6\xDFe \x80");
        assert_eq!(
            (d.encoding, d.declared, d.lossy),
            (WINDOWS_1252, Declared::Meta, false)
        );
        assert!(d.text.ends_with("Größe €"), "{}", d.text);
    }

    #[test]
    fn no_declaration_falls_back_and_counts_bad_bytes() {
        let d = decode(b"caf\xE9".to_vec(), Format::Plain, UTF_8);
        assert_eq!((d.text.as_str(), d.lossy), ("caf\u{FFFD}", true));
        let d = decode(b"caf\xE9".to_vec(), Format::Plain, WINDOWS_1252);
        assert_eq!((d.text.as_str(), d.lossy), ("café", false));
        // a meta in a plain text file is just text
        let d = decode(b"<meta charset=koi8-r>\xE9".to_vec(), Format::Plain, UTF_8);
        assert!(d.lossy);
    }
}
