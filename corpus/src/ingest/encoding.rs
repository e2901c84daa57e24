//! From a file's bytes to text, in the encoding the file declares, the way a browser finds it
//! (the WHATWG Encoding Standard and the HTML Standard's encoding sniffing).
//!
//! In order, the first that applies wins:
//! 1. a byte order mark (UTF-8, UTF-16LE, UTF-16BE, and UTF-32LE/BE, which the Encoding
//!    Standard leaves out and dapt decodes itself), in any format; it is removed, never text;
//! 2. for HTML, a UTF-16 XML declaration without a byte order mark (`<?x` in UTF-16, the HTML
//!    Standard's "prescan for UTF-16 XML declarations"); a `<meta charset>` or
//!    `<meta http-equiv="content-type" content="...charset=">` in the first 1024 bytes (the
//!    HTML Standard's *prescan*), or an XML declaration's `encoding="..."` (first, before a
//!    `<meta>`, in XHTML: a page that opens with one, after any whitespace, and whose root
//!    element is in the XHTML namespace, which dapt reads as XML); else a `<meta>` later in the
//!    `<head>`, explicit or implied (a browser's parser changes the encoding when it meets one
//!    there);
//! 3. the source's `encoding:` from the job file, else UTF-8.
//!
//! A declared legacy encoding over bytes that are UTF-8 with non-ASCII text (but for a few
//! bad bytes) is read as UTF-8 ([`Decoded::utf8_over_declared`]); the source's legacy
//! `encoding` over such bytes, or its UTF-16 over 8-bit text, is flagged.
//!
//! Labels map to encodings as the Encoding Standard says (so `iso-8859-1` and `latin1` decode as
//! windows-1252, as every browser does). The decoding itself is `encoding_rs`, Firefox's
//! implementation. Bytes that are not valid in the chosen encoding become U+FFFD and the file
//! is counted as decoded lossily; nothing is dropped silently. What cannot be text is refused
//! ([`Undecodable`]): a file that declares one of the encodings the Encoding Standard decodes as
//! a single U+FFFD (`replacement`: ISO-2022-KR, HZ-GB-2312, ...), text with NUL characters
//! (UTF-16 without a byte order mark read as UTF-8, or a binary file), a known binary format
//! under a text name ([`Undecodable::Binary`]), and bytes of which a large share decode to
//! U+FFFD or control characters ([`Undecodable::NotText`]: binary data without magic bytes). A declaration whose label
//! names no encoding is ignored, as a browser does, and kept for the report.

use encoding_rs::{Encoding, REPLACEMENT, UTF_16BE, UTF_16LE, UTF_8, WINDOWS_1252, X_USER_DEFINED};

use super::{xml_prolog, Format};

/// How many leading bytes of an HTML file the prescan reads, as the HTML Standard advises.
pub const PRESCAN_BYTES: usize = 1024;

/// NUL characters in at most this share of a file's characters are dropped (and the file
/// counted as lossy); more, and the file is refused as not text ([`Undecodable::Nul`]).
pub const MAX_NUL_SHARE: f64 = 0.01;

/// Where the encoding of a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Declared {
    /// A byte order mark at the start of the file.
    Bom,
    /// An HTML `<meta>` (or XML declaration).
    Meta,
    /// Nothing in the file: the source's configured encoding, or UTF-8.
    Fallback,
}

/// A file's text and how it was decoded.
#[derive(Debug)]
pub struct Decoded {
    /// The text, without the byte order mark.
    pub text: String,
    /// The encoding's name as the Encoding Standard spells it (`UTF-8`, `windows-1252`), or
    /// `UTF-32LE` / `UTF-32BE`.
    pub encoding: &'static str,
    pub declared: Declared,
    /// Some bytes were not valid in `encoding` and became U+FFFD (or were stray NULs, dropped).
    pub lossy: bool,
    /// The label of a declaration that names no encoding (`<meta charset="latin-1">`), ignored.
    pub unknown_label: Option<String>,
    /// Decoded with the source's legacy `encoding` although the bytes are UTF-8 with non-ASCII
    /// characters (valid, or but for a few bad bytes): likely the wrong setting for this file.
    pub utf8_under_legacy: bool,
    /// The legacy encoding the file declares (`<meta charset>`, an XML declaration), single-
    /// or multi-byte, when its bytes are UTF-8 with non-ASCII text (valid, or but for a few bad
    /// bytes, which make it `lossy`): read as UTF-8 instead (a page saved as UTF-8 under a
    /// stale `iso-8859-1` or `Shift_JIS` declaration, common on the web, became mojibake).
    pub utf8_over_declared: Option<&'static str>,
    /// Decoded as UTF-16 by the source's `encoding`, but 8-bit text ([`eight_bit_as_utf16`]):
    /// every two bytes became one CJK (or private-use) character.
    pub not_utf16: bool,
}

/// Why a file's bytes are not taken as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undecodable {
    /// The file declares `label`, an encoding the Encoding Standard maps to `replacement`.
    Replacement { label: String },
    /// Decoded as `encoding`, more than [`MAX_NUL_SHARE`] of its characters are NUL; `utf16` is
    /// `Some("utf-16le")` (or `be`) when the bytes look like UTF-16 without a byte order mark.
    Nul {
        encoding: &'static str,
        utf16: Option<&'static str>,
    },
    /// Not text but a known binary format (its magic bytes, by the `infer` crate): `mime` and
    /// its usual file extension. Only said of bytes that also fail as text (invalid in their
    /// encoding, or with control bytes): a text file that merely starts as a magic number
    /// (`BMW ...`, `MZ ...`) is text.
    Binary {
        mime: &'static str,
        extension: &'static str,
    },
    /// A `*.gz` file whose decompressed bytes are gzip data again: compressed twice (named
    /// [`Undecodable::Binary`], it was told to "rename it to `*.gz`", which it already was; an
    /// audit).
    GzipTwice,
    /// Decoded as `encoding`, more than [`MAX_NOT_TEXT_SHARE`] of its characters are U+FFFD or
    /// control characters text does not use ([`not_text_share`]): binary data without a magic
    /// number (zlib or raw deflate, encrypted or random bytes). `percent` is that share.
    NotText {
        encoding: &'static str,
        percent: u32,
    },
}

/// Decoded characters that are U+FFFD or controls text does not use ([`not_text`]) in more than
/// this share of a file's characters, and the file is refused as not text
/// ([`Undecodable::NotText`]). Binary data is far past it: compressed or random bytes read as
/// UTF-8 are mostly U+FFFD (over half their bytes are not valid there), and read in a
/// single-byte encoding 25 of every 256 bytes are such C0 controls (10%) and the C1 ones
/// (U+0080-U+009F, 5 to 32 bytes of 256) come on top. Text in a Latin script read in the wrong
/// encoding (windows-1252 as UTF-8: each accented letter one U+FFFD) stays under it, at 1-5%,
/// and is read lossily and named, as before; text whose every letter is lost (Cyrillic
/// windows-1251 read as UTF-8) is refused, and the error names the `encoding` setting.
pub const MAX_NOT_TEXT_SHARE: f64 = 0.10;
/// Fewer [`not_text`] characters than this never refuse a file, whatever their share: a short
/// text with one bad byte (`caf\xE9` read as UTF-8) is text with an error.
pub const MIN_NOT_TEXT_CHARS: usize = 64;

/// Whether a decoded character is no text: U+FFFD (bytes not valid in the encoding), a C0
/// control other than tab, line feed, vertical tab, form feed, carriage return and escape
/// (ANSI colour codes in logs), or a C1 control (U+0080-U+009F: no encoding's text decodes to
/// one, windows-1252's five undefined bytes and ISO-8859's 0x80-0x9F do).
fn not_text(c: char) -> bool {
    match c {
        '\u{FFFD}' | '\u{80}'..='\u{9F}' => true,
        '\t' | '\n' | '\u{0B}' | '\u{0C}' | '\r' | '\u{1B}' => false,
        c => c < ' ',
    }
}

/// The share of `text`'s characters that are [`not_text`], when it is more than
/// [`MAX_NOT_TEXT_SHARE`] and they are at least [`MIN_NOT_TEXT_CHARS`].
fn not_text_share(text: &str) -> Option<f64> {
    let (mut all, mut not) = (0usize, 0usize);
    for c in text.chars() {
        all += 1;
        not += usize::from(not_text(c));
    }
    let share = not as f64 / all.max(1) as f64;
    (not >= MIN_NOT_TEXT_CHARS && share > MAX_NOT_TEXT_SHARE).then_some(share)
}

impl Undecodable {
    /// This refusal of a file's bytes after gzip decompression (`gzip`: the file is a `*.gz`):
    /// gzip data there is gzip data compressed twice, which renaming does not mend.
    pub fn after_decompression(self, gzip: bool) -> Self {
        match self {
            Undecodable::Binary {
                extension: "gz", ..
            } if gzip => Undecodable::GzipTwice,
            other => other,
        }
    }
}

impl std::fmt::Display for Undecodable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undecodable::Replacement { label } => write!(
                f,
                "declares the encoding `{label}`, which the Encoding Standard decodes as a single \
                 U+FFFD (to keep it from being misread): dapt does not read it; convert the file \
                 (e.g. to UTF-8) or leave it out"
            ),
            Undecodable::Nul {
                encoding,
                utf16: Some(utf16),
            } => write!(
                f,
                "read as {encoding}, its text is full of NUL characters: it looks like \
                 {} without a byte order mark; set the source's `encoding: {utf16}` (or add \
                 the byte order mark)",
                utf16.to_ascii_uppercase()
            ),
            Undecodable::Binary { mime, extension } => {
                write!(f, "is not text but {mime} data (a .{extension} file): ")?;
                match *extension {
                    "gz" => write!(
                        f,
                        "dapt reads gzip-compressed inputs named `*.gz` (e.g. `notes.txt.gz`): \
                         rename it"
                    ),
                    _ => write!(
                        f,
                        "convert it to text or leave it out of the source's paths"
                    ),
                }
            }
            Undecodable::GzipTwice => write!(
                f,
                "is compressed twice: decompressed, it is gzip data again, and dapt decompresses \
                 a `*.gz` file once; compress its text once (`zcat FILE | zcat | gzip > \
                 NEW.txt.gz`)"
            ),
            Undecodable::Nul {
                encoding,
                utf16: None,
            } => write!(
                f,
                "read as {encoding}, its text is full of NUL characters: it is not text (a \
                 binary file?) in that encoding; leave it out or set the source's `encoding`"
            ),
            Undecodable::NotText { encoding, percent } => write!(
                f,
                "is not text: read as {encoding}, {percent}% of its characters are bytes not \
                 valid there (U+FFFD) or control characters, which is binary data (compressed, \
                 such as zlib or deflate, encrypted or random bytes); leave it out of the \
                 source's paths, or, if it is text in another encoding, set the source's \
                 `encoding`"
            ),
        }
    }
}

/// Decodes `raw` (a whole file, decompressed) of `format`; `fallback` is the encoding of a file
/// that declares none (UTF-8 unless the job says otherwise).
///
/// # Errors
/// [`Undecodable`]: a declared `replacement` encoding, text full of NULs, or a binary format.
pub fn decode(
    raw: Vec<u8>,
    format: Format,
    fallback: &'static Encoding,
) -> Result<Decoded, Undecodable> {
    // A compressed or binary file under a text name (gzip data named `.txt`: under the NUL
    // bound, it was tokenized as 44,000 characters of junk, one generic warning; an audit):
    // refused as what its magic bytes say when it is also no text in the encoding it is read
    // in (bytes invalid there, NULs, or other control bytes). A windows-1252 text that begins
    // `BMW-H\xe4ndler` is text.
    let binary = binary_format(&raw);
    let decoded = match (binary, decode_text(raw, format, fallback)) {
        (Some((refusal, _)), Err(Undecodable::Nul { .. })) => return Err(refusal),
        (Some((refusal, controls)), Ok(decoded)) if decoded.lossy || controls => {
            return Err(refusal)
        }
        (_, decoded) => decoded?,
    };
    // Binary data without a magic number (zlib, raw deflate, random bytes under `.txt`) was
    // tokenized as junk with one warning about lossy decoding (an audit).
    if let Some(share) = not_text_share(&decoded.text) {
        return Err(Undecodable::NotText {
            encoding: decoded.encoding,
            percent: (share * 100.0).round() as u32,
        });
    }
    Ok(decoded)
}

/// [`decode`] without the check for binary formats.
fn decode_text(
    raw: Vec<u8>,
    format: Format,
    fallback: &'static Encoding,
) -> Result<Decoded, Undecodable> {
    if let Some(big_endian) = utf32_bom(&raw) {
        let (text, lossy) = decode_utf32(&raw[4..], big_endian);
        let encoding = if big_endian { "UTF-32BE" } else { "UTF-32LE" };
        return finish(text, encoding, Declared::Bom, lossy, None, false, &raw[4..]).map(|d| {
            Decoded {
                utf8_over_declared: None,
                ..d
            }
        });
    }
    let mut labels = Labels::default();
    let (encoding, declared, skip) = if let Some((enc, bom)) = Encoding::for_bom(&raw) {
        (enc, Declared::Bom, bom)
    } else if let Some(enc) = (format == Format::Html)
        .then(|| html_declaration(&raw, &mut labels))
        .flatten()
    {
        (enc, Declared::Meta, 0)
    } else {
        (fallback, Declared::Fallback, 0)
    };
    // A declared legacy encoding over bytes that are UTF-8 with non-ASCII text (but for a few
    // bad bytes: a page cut mid-character, one stray byte): real legacy text almost never is
    // (single-byte text would take `Ã` + symbol pairs throughout, CJK double-byte text lead and
    // trail bytes that fall into UTF-8's patterns character after character), a page re-saved
    // as UTF-8 under its old declaration is common. Read as UTF-8 (lossily, if so), and said.
    let utf8_over_declared = (declared == Declared::Meta
        && encoding != UTF_8
        && encoding != UTF_16LE
        && encoding != UTF_16BE
        && encoding != REPLACEMENT
        && Utf8Shape::of(&raw).reads_as_utf8())
    .then(|| encoding.name());
    let encoding = if utf8_over_declared.is_some() {
        UTF_8
    } else {
        encoding
    };
    if encoding == REPLACEMENT {
        return Err(Undecodable::Replacement {
            label: labels.replacement.unwrap_or_else(|| "replacement".into()),
        });
    }
    // A known declaration wins; an unknown one before it is not worth a word.
    let unknown = if declared == Declared::Meta {
        None
    } else {
        labels.unknown
    };
    let utf8_under_legacy =
        declared == Declared::Fallback && encoding != UTF_8 && Utf8Shape::of(&raw).reads_as_utf8();
    if encoding == UTF_8 {
        // The common case: valid UTF-8 is taken as it is, without a copy.
        let mut raw = raw;
        raw.drain(..skip);
        let (text, lossy) = match String::from_utf8(raw) {
            Ok(text) => (text, false),
            Err(e) => (String::from_utf8_lossy(e.as_bytes()).into_owned(), true),
        };
        let bytes = if text.contains('\0') {
            text.as_bytes().to_vec()
        } else {
            Vec::new()
        };
        finish(text, UTF_8.name(), declared, lossy, unknown, false, &bytes).map(|d| Decoded {
            utf8_over_declared,
            ..d
        })
    } else {
        let (text, lossy) = encoding.decode_without_bom_handling(&raw[skip..]);
        // ASCII reads the same in every single-byte legacy encoding, but not as UTF-16 (two
        // ASCII letters become one CJK character).
        let not_utf16 = declared == Declared::Fallback
            && (encoding == UTF_16LE || encoding == UTF_16BE)
            && !utf8_under_legacy
            && eight_bit_as_utf16(&raw, &text);
        finish(
            text.into_owned(),
            encoding.name(),
            declared,
            lossy,
            unknown,
            utf8_under_legacy,
            &raw[skip..],
        )
        .map(|d| Decoded { not_utf16, ..d })
    }
}

/// Both the bytes at even offsets and those at odd ones at least this ASCII, and bytes read as
/// UTF-16 without a NUL byte are 8-bit text ([`eight_bit_as_utf16`]).
const EIGHT_BIT_ASCII_SHARE: f64 = 0.8;
/// At least this share of characters (and two) private-use or U+FFFD (a lone surrogate, which
/// real UTF-16 does not hold), and bytes read as UTF-16 without a NUL byte are 8-bit text
/// ([`eight_bit_as_utf16`]). KOI8-R Russian read so is 10-15% U+FFFD.
const EIGHT_BIT_PRIVATE_USE_SHARE: f64 = 0.05;

/// Whether `raw`, decoded as UTF-16 into `text`, is 8-bit text instead. UTF-16 gives every
/// ASCII character (a space, a line break, a digit) a zero byte, so real UTF-16 without one is
/// text in a script beyond ASCII alone: CJK, where the low byte of a character is anything
/// (ASCII about half the time) and the high byte is `0x30`, `0x4E`-`0x9F`, `0xAC`-`0xD7` ...
/// 8-bit text without a NUL is instead either mostly ASCII at both byte offsets (a Latin script:
/// windows-1252 German read as UTF-16LE became CJK, without a word; an audit), or text whose
/// letters, read as high bytes, fall into the private-use area or are lone surrogates
/// (windows-1251 lowercase Cyrillic is `0xE0`-`0xFF`, KOI8-R's has `0xD8`-`0xDF`).
fn eight_bit_as_utf16(raw: &[u8], text: &str) -> bool {
    if raw.is_empty() || raw.contains(&0) {
        return false;
    }
    let ascii_share = |parity: usize| {
        let (mut all, mut ascii) = (0usize, 0usize);
        for &b in raw.iter().skip(parity).step_by(2) {
            all += 1;
            ascii += usize::from(b.is_ascii());
        }
        // A one-byte file has no odd bytes: nothing there speaks against ASCII.
        if all == 0 {
            1.0
        } else {
            ascii as f64 / all as f64
        }
    };
    let (mut all, mut private, mut kana) = (0usize, 0usize, 0usize);
    for c in text.chars() {
        all += 1;
        private += usize::from(matches!(c, '\u{E000}'..='\u{F8FF}' | '\u{FFFD}'));
        kana += usize::from(matches!(c, '\u{3000}'..='\u{30FF}'));
    }
    // Kana (and CJK punctuation) are the one real UTF-16 text both of whose bytes can be
    // ASCII (`U+3042` is `42 30`, "B0"): mostly kana, it is not 8-bit text.
    (ascii_share(0).min(ascii_share(1)) >= EIGHT_BIT_ASCII_SHARE && kana * 2 < all)
        || (private >= 2 && private as f64 >= EIGHT_BIT_PRIVATE_USE_SHARE * all as f64)
}

/// How bytes read as UTF-8: how many of their sequences are valid multi-byte characters and
/// how many are not valid (a sequence cut off by the end of the bytes not counted: a file cut
/// mid-character, as crawls and `head -c` leave them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Utf8Shape {
    multibyte: usize,
    invalid: usize,
}

/// At most one invalid sequence for this many valid multi-byte characters, and bytes are
/// UTF-8 with errors ([`Utf8Shape::reads_as_utf8`]). Legacy text read as UTF-8 has it the other
/// way round: each accented letter (`f\xFCr`), or most CJK characters, an invalid sequence,
/// and a valid one only by chance (`\xC3\xA9`, `Ã©`, is rare in real windows-1252 text).
const MULTIBYTE_PER_INVALID: usize = 4;

impl Utf8Shape {
    fn of(mut bytes: &[u8]) -> Self {
        // In valid UTF-8, the bytes from 0xC0 up are exactly the lead bytes of multi-byte
        // characters.
        let leads = |valid: &[u8]| valid.iter().filter(|&&b| b >= 0xC0).count();
        let mut shape = Utf8Shape::default();
        loop {
            match std::str::from_utf8(bytes) {
                Ok(_) => {
                    return Utf8Shape {
                        multibyte: shape.multibyte + leads(bytes),
                        ..shape
                    }
                }
                Err(e) => {
                    shape.multibyte += leads(&bytes[..e.valid_up_to()]);
                    let Some(bad) = e.error_len() else {
                        return shape;
                    };
                    shape.invalid += 1;
                    bytes = &bytes[e.valid_up_to() + bad..];
                }
            }
        }
    }

    /// UTF-8 text with non-ASCII characters, whole or with a few errors
    /// ([`MULTIBYTE_PER_INVALID`]).
    fn reads_as_utf8(self) -> bool {
        self.multibyte > 0 && self.invalid * MULTIBYTE_PER_INVALID <= self.multibyte
    }
}

/// The [`Decoded`], after the NUL check on `text` (`raw`: the bytes it came from, for the
/// UTF-16 guess; only read when `text` holds a NUL).
fn finish(
    mut text: String,
    encoding: &'static str,
    declared: Declared,
    mut lossy: bool,
    unknown_label: Option<String>,
    utf8_under_legacy: bool,
    raw: &[u8],
) -> Result<Decoded, Undecodable> {
    if text.contains('\0') {
        let nuls = text.chars().filter(|&c| c == '\0').count();
        if nuls as f64 > MAX_NUL_SHARE * text.chars().count() as f64 {
            return Err(Undecodable::Nul {
                encoding,
                utf16: utf16_guess(raw),
            });
        }
        text.retain(|c| c != '\0');
        lossy = true;
    }
    Ok(Decoded {
        text,
        encoding,
        declared,
        lossy,
        unknown_label,
        utf8_under_legacy,
        utf8_over_declared: None,
        not_utf16: false,
    })
}

/// The binary format `raw`'s magic bytes name (by the `infer` crate; one it counts as text,
/// HTML or XML, is none), as its refusal, and whether its first 8 KiB hold a C0 control byte
/// that text does not use (not a tab, line feed, form feed, carriage return or escape).
fn binary_format(raw: &[u8]) -> Option<(Undecodable, bool)> {
    let kind = infer::get(raw).filter(|k| k.matcher_type() != infer::MatcherType::Text)?;
    let controls = raw[..raw.len().min(8192)]
        .iter()
        .any(|&b| b < 0x20 && !matches!(b, b'\t' | b'\n' | 0x0C | b'\r' | 0x1B));
    let refusal = Undecodable::Binary {
        mime: kind.mime_type(),
        extension: kind.extension(),
    };
    Some((refusal, controls))
}

/// `Some(big_endian)` for a UTF-32 byte order mark (`FF FE 00 00` or `00 00 FE FF`).
fn utf32_bom(raw: &[u8]) -> Option<bool> {
    match raw.get(..4)? {
        [0xFF, 0xFE, 0, 0] => Some(false),
        [0, 0, 0xFE, 0xFF] => Some(true),
        _ => None,
    }
}

/// UTF-32 (Unicode's definition: each 4 bytes one scalar value); a value that is none, or a
/// cut-off last unit, becomes U+FFFD. Returns the text and whether any did.
fn decode_utf32(bytes: &[u8], big_endian: bool) -> (String, bool) {
    let mut lossy = !bytes.len().is_multiple_of(4);
    let mut text = String::with_capacity(bytes.len() / 4);
    for unit in bytes.chunks_exact(4) {
        let unit = [unit[0], unit[1], unit[2], unit[3]];
        let value = if big_endian {
            u32::from_be_bytes(unit)
        } else {
            u32::from_le_bytes(unit)
        };
        text.push(char::from_u32(value).unwrap_or_else(|| {
            lossy = true;
            char::REPLACEMENT_CHARACTER
        }));
    }
    if !bytes.len().is_multiple_of(4) {
        text.push(char::REPLACEMENT_CHARACTER);
    }
    (text, lossy)
}

/// `Some("utf-16le")` (or `be`) when at least a quarter of the odd (even) bytes of `raw` are
/// zero and almost none of the others: ASCII-heavy text in UTF-16 without a byte order mark.
fn utf16_guess(raw: &[u8]) -> Option<&'static str> {
    let pairs = raw.len() / 2;
    if pairs < 2 {
        return None;
    }
    let zero = |parity: usize| {
        raw.iter()
            .skip(parity)
            .step_by(2)
            .filter(|&&b| b == 0)
            .count()
    };
    let (even, odd) = (zero(0), zero(1));
    if odd * 4 >= pairs && even * 20 <= pairs {
        Some("utf-16le")
    } else if even * 4 >= pairs && odd * 20 <= pairs {
        Some("utf-16be")
    } else {
        None
    }
}

/// What an HTML file without a byte order mark declares: a UTF-16 XML declaration, else the
/// prescan of the first [`PRESCAN_BYTES`], else a `<meta>` in the rest of the `<head>`
/// ([`head_meta`]). `labels` gets the labels worth naming (a `replacement` encoding's is
/// returned as REPLACEMENT).
fn html_declaration(raw: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    if raw.starts_with(&[0x3C, 0, 0x3F, 0, 0x78, 0]) {
        return Some(UTF_16LE);
    }
    if raw.starts_with(&[0, 0x3C, 0, 0x3F, 0, 0x78]) {
        return Some(UTF_16BE);
    }
    // XHTML (an XML declaration, a root element in the XHTML namespace, however far down),
    // which dapt reads as XML: the declaration's encoding wins over a `<meta>`, as in XML
    // readers (a stale `<meta>` of an EPUB chapter won over it; an audit).
    if xml_prolog::root_is_xhtml(raw) {
        if let Some(found) = xml_declaration(raw, labels) {
            return Some(in_page(found));
        }
    }
    let first = &raw[..raw.len().min(PRESCAN_BYTES)];
    if let Some(found) = prescan_noting(first, labels) {
        return Some(found);
    }
    if raw.len() <= PRESCAN_BYTES {
        return None;
    }
    head_meta(raw, labels).map(in_page)
}

/// The position of the first `needle` (ASCII, lowercase) in `bytes` at or after `from`,
/// ignoring ASCII case.
fn find_ignore_case(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|i| from + i)
}

/// Elements that belong in a `<head>`, with [`HEAD_TEXT_ELEMENTS`]: any other start tag ends it
/// (and opens the body, when a page leaves both implied), as in the HTML parser's "in head"
/// insertion mode.
const HEAD_ELEMENTS: &[&[u8]] = &[
    b"html",
    b"head",
    b"base",
    b"basefont",
    b"bgsound",
    b"link",
    b"meta",
];

/// Head elements whose content is not markup to a browser (raw text, RCDATA, a template's
/// inert content): a `<meta>` written there by a script, or shown as a title, is none.
const HEAD_TEXT_ELEMENTS: &[&[u8]] = &[
    b"title",
    b"style",
    b"script",
    b"noscript",
    b"noframes",
    b"template",
];

/// The first `<meta>` that declares an encoding in the page's `<head>`, explicit or implied,
/// read past the prescan's bytes as a browser's parser meets it there (and changes the
/// encoding): the head ends at `</head`, `<body`, `</body`, `</html`, the first start tag of
/// an element that does not belong in a head (neither [`HEAD_ELEMENTS`] nor
/// [`HEAD_TEXT_ELEMENTS`]: `<p>`, `<div>`), or text that
/// is not whitespace. The content of [`HEAD_TEXT_ELEMENTS`] is skipped. A page without
/// `<head>` or `<body>` tags has its `<meta>` taken too (before, only one with either was; an
/// audit), and a `<meta>` in sample code or a script is not.
fn head_meta(b: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    let tag_name = |from: usize| {
        let len = b[from..]
            .iter()
            .take_while(|&&c| !is_space(c) && c != b'>' && c != b'/')
            .count();
        (b[from..from + len].to_ascii_lowercase(), from + len)
    };
    let mut pos = 0;
    while pos < b.len() {
        if b[pos..].starts_with(b"<!--") {
            // To the `>` of the first `-->` after the `<` (`<!-->` closes itself).
            pos = find(b, pos + 2, b"-->")? + 2;
        } else if b[pos] == b'<' && b.get(pos + 1).is_some_and(u8::is_ascii_alphabetic) {
            let (name, end) = tag_name(pos + 1);
            let text = HEAD_TEXT_ELEMENTS.contains(&name.as_slice());
            if !text && !HEAD_ELEMENTS.contains(&name.as_slice()) {
                return None;
            }
            pos = end;
            if name == b"meta" {
                if let Some(found) = meta_element(b, &mut pos, labels)? {
                    return Some(found);
                }
            } else {
                while attribute(b, &mut pos)?.is_some() {}
            }
            if text {
                pos = find_ignore_case(b, pos, &[b"</".as_slice(), &name].concat())?;
                continue;
            }
        } else if b[pos..].starts_with(b"</") && b.get(pos + 2).is_some_and(u8::is_ascii_alphabetic)
        {
            let (name, _) = tag_name(pos + 2);
            if matches!(name.as_slice(), b"head" | b"body" | b"html" | b"br") {
                return None;
            }
            pos = find(b, pos, b">")?;
        } else if b[pos..].starts_with(b"<!") || b[pos..].starts_with(b"<?") {
            pos = find(b, pos + 1, b">")?;
        } else if !is_space(b[pos]) {
            return None;
        }
        pos += 1;
    }
    None
}

/// The encoding that a `<meta>` in `bytes` declares, by the HTML Standard's "prescan a byte
/// stream to determine its encoding" (with its "get an attribute" and "extracting a character
/// encoding from a meta element"), or else an XML declaration's. Only `bytes` are read: a
/// construct cut off at their end declares nothing. UTF-16 declared inside the page itself
/// means UTF-8 (the page could not have been read as ASCII otherwise), as the standard says.
pub fn prescan(bytes: &[u8]) -> Option<&'static Encoding> {
    prescan_noting(bytes, &mut Labels::default())
}

/// [`prescan`], keeping the labels worth naming in `labels`.
fn prescan_noting(bytes: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    let found = meta_scan(bytes, labels).or_else(|| xml_declaration(bytes, labels))?;
    Some(in_page(found))
}

/// An encoding declared inside the page: UTF-16 means UTF-8, x-user-defined windows-1252.
fn in_page(found: &'static Encoding) -> &'static Encoding {
    if found == UTF_16LE || found == UTF_16BE {
        UTF_8
    } else if found == X_USER_DEFINED {
        WINDOWS_1252
    } else {
        found
    }
}

/// Declared labels worth naming: the first that names no encoding, and the first that names
/// the `replacement` encoding.
#[derive(Debug, Default)]
struct Labels {
    unknown: Option<String>,
    replacement: Option<String>,
}

/// The encoding `label` names; a label that names none, or `replacement`, is kept in `labels`.
fn label(value: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    let found = Encoding::for_label(value);
    let slot = match found {
        None => &mut labels.unknown,
        Some(e) if e == REPLACEMENT => &mut labels.replacement,
        Some(_) => return found,
    };
    if slot.is_none() {
        *slot = Some(String::from_utf8_lossy(value).trim().to_owned());
    }
    found
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
fn meta_scan(b: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    let mut pos = 0;
    while pos < b.len() {
        if b[pos..].starts_with(b"<!--") {
            // To the `>` of the first `-->` after the `<` (`<!-->` closes itself).
            pos = find(b, pos + 2, b"-->")? + 2;
        } else if starts_with_ignore_case(b, pos, b"<meta")
            && b.get(pos + 5).is_some_and(|&c| is_space(c) || c == b'/')
        {
            pos += 6;
            if let Some(found) = meta_element(b, &mut pos, labels)? {
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
fn meta_element(
    b: &[u8],
    pos: &mut usize,
    labels: &mut Labels,
) -> Option<Option<&'static Encoding>> {
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
                if let Some(found) = charset_from_content(&value, labels) {
                    charset = Some(found);
                    need_pragma = Some(true);
                }
            }
            b"charset" => {
                charset = label(&value, labels);
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
fn charset_from_content(s: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
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
            label(&s[pos + 1..end], labels)
        }
        _ => {
            let end = s[pos..]
                .iter()
                .position(|&c| is_space(c) || c == b';')
                .map_or(s.len(), |i| pos + i);
            label(&s[pos..end], labels)
        }
    }
}

/// An XML declaration's encoding (`<?xml version="1.0" encoding="ISO-8859-1"?>`), for XHTML
/// files; the HTML Standard's "get an XML encoding", but after any leading whitespace, as
/// [`super::html::is_xhtml`] takes an XML declaration there (a `.xhtml` file that opened with a
/// line break was read as XHTML, its declared encoding ignored; an audit).
fn xml_declaration(b: &[u8], labels: &mut Labels) -> Option<&'static Encoding> {
    let b = &b[xml_prolog::leading_space(b)..];
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
    label(&decl[pos + 1..close], labels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::{SHIFT_JIS, WINDOWS_1251};

    fn html(bytes: &[u8]) -> Decoded {
        decode(bytes.to_vec(), Format::Html, UTF_8).unwrap()
    }

    #[test]
    fn boms_win_and_are_removed_in_every_format() {
        for format in [Format::Plain, Format::Jsonl, Format::Html] {
            let d = decode(b"\xEF\xBB\xBFhi".to_vec(), format, WINDOWS_1252).unwrap();
            assert_eq!(
                (d.text.as_str(), d.declared, d.lossy),
                ("hi", Declared::Bom, false)
            );
            let mut bytes = vec![0xFF, 0xFE];
            bytes.extend("Größe".encode_utf16().flat_map(u16::to_le_bytes));
            let d = decode(bytes, format, UTF_8).unwrap();
            assert_eq!((d.text.as_str(), d.encoding), ("Größe", "UTF-16LE"));
            let mut bytes = vec![0xFE, 0xFF];
            bytes.extend("Größe".encode_utf16().flat_map(u16::to_be_bytes));
            let d = decode(bytes, format, UTF_8).unwrap();
            assert_eq!((d.text.as_str(), d.encoding), ("Größe", "UTF-16BE"));
        }
    }

    #[test]
    fn a_bom_beats_a_meta() {
        let d = html(b"\xEF\xBB\xBF<meta charset=iso-8859-1><p>\xC3\xA9");
        assert_eq!(d.encoding, "UTF-8");
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
        // One `<meta>` with both: its `charset` attribute wins wherever it stands; `content`
        // counts only while no `charset` is set (the HTML Standard's prescan, and Firefox's).
        for meta in [
            &b"<meta http-equiv=Content-Type content=\"text/html; charset=windows-1252\" \
               charset=\"utf-8\">"[..],
            b"<meta charset=\"utf-8\" http-equiv=Content-Type \
              content=\"text/html; charset=windows-1252\">",
        ] {
            assert_eq!(prescan(meta), Some(UTF_8));
        }
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
        // In XHTML (the namespace named) the declaration wins over a `<meta>` of another
        // encoding, as in XML readers; in a page read as HTML the `<meta>` does, as browsers do.
        let page = |html: &[u8]| {
            [
                &b"<?xml version=\"1.0\" encoding=\"windows-1251\"?>"[..],
                html,
                b"<head><meta http-equiv=\"Content-Type\" content=\"text/html; \
                  charset=iso-8859-1\"/></head><body><p>\xcf\xf0\xe8\xe2\xe5\xf2</p></body>\
                  </html>",
            ]
            .concat()
        };
        let xhtml = html(&page(b"<html xmlns=\"http://www.w3.org/1999/xhtml\">"));
        assert_eq!(xhtml.encoding, "windows-1251");
        assert!(xhtml
            .text
            .contains("\u{41f}\u{440}\u{438}\u{432}\u{435}\u{442}"));
        assert_eq!(html(&page(b"<html>")).encoding, "windows-1252");
    }

    /// A `.xhtml` page that opens with a line break before its XML declaration was read as
    /// XHTML, but its declared encoding was ignored (taken only at byte 0): windows-1252 read
    /// as UTF-8, lossily (an audit). The declaration counts after whitespace, as XHTML does.
    #[test]
    fn an_xml_declaration_after_leading_whitespace_counts() {
        for space in ["\n", "\r\n  ", "\t"] {
            let page = [
                space.as_bytes(),
                b"<?xml version=\"1.0\" encoding=\"windows-1252\"?>\n<html \
                  xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>Gr\xF6\xDFe \x93q\x94</p>\
                  </body></html>",
            ]
            .concat();
            let d = html(&page);
            assert_eq!(
                (d.encoding, d.declared, d.lossy),
                ("windows-1252", Declared::Meta, false)
            );
            assert!(d.text.contains("<p>Größe “q”</p>"), "{}", d.text);
        }
    }

    /// gzip data named `.txt` (0.3% NULs, under the NUL bound) was stored as 44,000
    /// characters of junk (an audit): refused as what it is, in any encoding; a text that only
    /// starts as a magic number does is text.
    #[test]
    fn binary_formats_under_a_text_name_are_refused_as_what_they_are() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&b"some text to compress, ".repeat(200))
            .expect("gz");
        let gz = gz.finish().expect("gz");
        for fallback in [UTF_8, encoding_rs::WINDOWS_1252] {
            let err = decode(gz.clone(), Format::Plain, fallback).expect_err("binary");
            assert_eq!(
                err,
                Undecodable::Binary {
                    mime: "application/gzip",
                    extension: "gz"
                }
            );
            assert!(err.to_string().contains("named `*.gz`"), "{err}");
        }
        let pdf =
            b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 5 >>\nstream\n\x01\x02".to_vec();
        let err = decode(pdf, Format::Plain, UTF_8).expect_err("binary");
        assert!(err.to_string().contains("application/pdf"), "{err}");
        for text in [
            &b"BMW and MZ are names."[..],
            b"MZ\xc3\xa9 text",
            b"ID3 tags\n",
        ] {
            decode(text.to_vec(), Format::Plain, UTF_8).expect("text");
        }
        // Legacy text that begins as a magic number is text in its encoding (it was refused as
        // image/bmp: it is not UTF-8).
        let legacy = b"BMW-H\xe4ndler in M\xfcnchen".to_vec();
        let d = decode(legacy, Format::Plain, encoding_rs::WINDOWS_1252).expect("text");
        assert_eq!(d.text, "BMW-H\u{e4}ndler in M\u{fc}nchen");
    }

    /// zlib or raw deflate data, or random bytes, under a text name have no magic number: they
    /// were tokenized as junk with one warning about lossy decoding (an audit). Refused as not
    /// text in any encoding; legacy text read with a few errors is still text.
    #[test]
    fn binary_data_without_magic_bytes_is_refused_and_text_with_errors_is_not() {
        use std::io::Write;
        let text: String = (0..2000)
            .map(|i| {
                format!(
                    "line {i}: the dose was {} mg, patient {}\n",
                    i % 37,
                    i * 7919
                )
            })
            .collect();
        let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        zlib.write_all(text.as_bytes()).expect("zlib");
        let mut deflate =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        deflate.write_all(text.as_bytes()).expect("deflate");
        // deterministic pseudo-random bytes (xorshift)
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let random: Vec<u8> = (0..65_536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 56) as u8
            })
            .collect();
        for (what, bytes) in [
            ("zlib", zlib.finish().expect("zlib")),
            ("deflate", deflate.finish().expect("deflate")),
            ("random", random),
        ] {
            assert!(infer::get(&bytes).is_none(), "{what} has no magic number");
            for fallback in [UTF_8, WINDOWS_1252, encoding_rs::ISO_8859_2] {
                for format in [Format::Plain, Format::Html] {
                    let err = decode(bytes.clone(), format, fallback).expect_err(what);
                    assert!(
                        matches!(err, Undecodable::NotText { percent, .. } if percent >= 10),
                        "{what} as {}: {err}",
                        fallback.name()
                    );
                    assert!(err.to_string().starts_with("is not text"), "{err}");
                }
            }
        }
        // windows-1252 German and French read as UTF-8 (each accented letter a U+FFFD), a
        // UTF-8 file with a few stray bytes, a log with ANSI colours and form feeds: text.
        let german = "Die Bundesregierung hat am Dienstag einen neuen Plan f\u{fc}r den \
            \u{f6}ffentlichen Nahverkehr vorgestellt, der zus\u{e4}tzliche Mittel f\u{fc}r Busse \
            und Bahnen vorsieht. "
            .repeat(300);
        let french = "Le gouvernement a pr\u{e9}sent\u{e9} mardi un nouveau plan pour les \
            transports publics dans la r\u{e9}gion parisienne, avec des investissements pour les \
            lignes de bus et de m\u{e9}tro. "
            .repeat(300);
        let mut stray = text.clone().into_bytes();
        for i in (100..stray.len()).step_by(997) {
            stray[i] = 0x92;
        }
        let log = "\x1b[31merror\x1b[0m: page\x0c\tdone\x0b\r\n".repeat(500);
        for bytes in [
            german.chars().map(|c| c as u8).collect::<Vec<u8>>(),
            french.chars().map(|c| c as u8).collect(),
            stray,
            log.into_bytes(),
        ] {
            let d = decode(bytes, Format::Plain, UTF_8).expect("text with errors is text");
            assert!(d.text.len() > 1000);
        }
    }

    #[test]
    fn declared_latin1_decodes_as_windows_1252() {
        // 0x80 is the euro sign in windows-1252, which browsers use for "iso-8859-1".
        let d = html(b"<meta charset=\"iso-8859-1\"><p>Gr\xF6\xDFe \x80");
        assert_eq!(
            (d.encoding, d.declared, d.lossy),
            ("windows-1252", Declared::Meta, false)
        );
        assert!(d.text.ends_with("Größe €"), "{}", d.text);
    }

    #[test]
    fn no_declaration_falls_back_and_counts_bad_bytes() {
        let d = decode(b"caf\xE9".to_vec(), Format::Plain, UTF_8).unwrap();
        assert_eq!((d.text.as_str(), d.lossy), ("caf\u{FFFD}", true));
        let d = decode(b"caf\xE9".to_vec(), Format::Plain, WINDOWS_1252).unwrap();
        assert_eq!((d.text.as_str(), d.lossy), ("café", false));
        // a meta in a plain text file is just text
        let d = decode(b"<meta charset=koi8-r>\xE9".to_vec(), Format::Plain, UTF_8).unwrap();
        assert!(d.lossy);
    }

    #[test]
    fn utf32_boms_are_decoded_not_taken_for_utf16() {
        let text = "Größe 😀 hello";
        let mut le = vec![0xFF, 0xFE, 0, 0];
        le.extend(text.chars().flat_map(|c| (c as u32).to_le_bytes()));
        let mut be = vec![0, 0, 0xFE, 0xFF];
        be.extend(text.chars().flat_map(|c| (c as u32).to_be_bytes()));
        for (bytes, name) in [(le, "UTF-32LE"), (be, "UTF-32BE")] {
            for format in [Format::Plain, Format::Jsonl, Format::Html] {
                let d = decode(bytes.clone(), format, UTF_8).unwrap();
                assert_eq!((d.text.as_str(), d.encoding, d.lossy), (text, name, false));
            }
        }
        // a surrogate and a cut-off last unit become U+FFFD, counted
        let d = decode(
            vec![0xFF, 0xFE, 0, 0, 0x00, 0xD8, 0, 0, b'a', 0],
            Format::Plain,
            UTF_8,
        )
        .unwrap();
        assert_eq!((d.text.as_str(), d.lossy), ("\u{FFFD}\u{FFFD}", true));
    }

    #[test]
    fn text_full_of_nuls_is_refused_with_a_utf16_guess_and_stray_nuls_are_dropped() {
        let le: Vec<u8> = "plain utf16 text without a bom"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        let be: Vec<u8> = "plain utf16 text"
            .encode_utf16()
            .flat_map(u16::to_be_bytes)
            .collect();
        for format in [Format::Plain, Format::Jsonl, Format::Html] {
            assert_eq!(
                decode(le.clone(), format, UTF_8).unwrap_err(),
                Undecodable::Nul {
                    encoding: "UTF-8",
                    utf16: Some("utf-16le")
                }
            );
            assert_eq!(
                decode(be.clone(), format, WINDOWS_1252).unwrap_err(),
                Undecodable::Nul {
                    encoding: "windows-1252",
                    utf16: Some("utf-16be")
                }
            );
        }
        let e = decode(vec![0, 0, 0, 1, 2, 0, 0, 0], Format::Plain, UTF_8).unwrap_err();
        assert_eq!(
            e,
            Undecodable::Nul {
                encoding: "UTF-8",
                utf16: None
            }
        );
        assert!(e.to_string().contains("NUL"), "{e}");
        // set as the source's encoding, the same bytes are text
        let d = decode(le, Format::Plain, UTF_16LE).unwrap();
        assert_eq!(d.text, "plain utf16 text without a bom");
        // one stray NUL in a long text: dropped, the file counted as lossy
        let mut stray = "a long enough line of ordinary text, "
            .repeat(4)
            .into_bytes();
        stray.insert(10, 0);
        let d = decode(stray, Format::Plain, UTF_8).unwrap();
        assert!(d.lossy && !d.text.contains('\0'), "{d:?}");
    }

    #[test]
    fn a_utf16_xml_declaration_without_a_bom_is_utf16() {
        let page =
            "<?xml version=\"1.0\" encoding=\"UTF-16\"?><html><body><p>Größe</p></body></html>";
        let le: Vec<u8> = page.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let be: Vec<u8> = page.encode_utf16().flat_map(u16::to_be_bytes).collect();
        for (bytes, name) in [(le, "UTF-16LE"), (be, "UTF-16BE")] {
            let d = html(&bytes);
            assert_eq!(
                (d.text.as_str(), d.encoding, d.declared),
                (page, name, Declared::Meta)
            );
        }
    }

    #[test]
    fn a_meta_after_the_first_1024_bytes_of_the_head_counts() {
        let mut page = b"<html><head><style>".to_vec();
        page.extend(b"/* padding */\n".repeat(100));
        page.extend(b"</style><meta charset=\"windows-1252\"></head><body><p>Gr\xF6\xDFe</p>");
        assert!(page.len() > PRESCAN_BYTES);
        let d = html(&page);
        assert_eq!(
            (d.encoding, d.declared, d.lossy),
            ("windows-1252", Declared::Meta, false)
        );
        assert!(d.text.ends_with("Größe</p>"), "{}", d.text);
        // not in a script, where the `<p>` after it ends the implied head
        let mut page = b"<html><script>".to_vec();
        page.extend(b"var x = 1;\n".repeat(100));
        page.extend(b"document.write('<meta charset=\"windows-1252\">');</script><p>Gr\xC3\xB6\xC3\x9Fe</p>");
        let d = html(&page);
        assert_eq!((d.declared, d.lossy), (Declared::Fallback, false));
        // not one in the body
        let mut page = b"<html><head></head><body>".to_vec();
        page.extend(b"<p>x</p>\n".repeat(200));
        page.extend(b"<meta charset=\"windows-1252\"><p>Gr\xF6\xDFe</p>");
        assert_eq!(html(&page).declared, Declared::Fallback);
    }

    /// A `<meta>` past the first 1024 bytes counted only when the page had a `</head` or a
    /// `<body` tag (an audit: a page with a long comment and no head or body tags, whose head
    /// a browser implies, was read as UTF-8, lossily). The head ends where a browser's parser
    /// ends it: at an element that does not belong there, or text; a script's or a title's
    /// content is not markup.
    #[test]
    fn a_late_meta_in_an_implied_head_counts() {
        let comment = format!("<!-- {} -->", "x".repeat(1200));
        let page = |head: &str, body: &[u8]| {
            [format!("<!DOCTYPE html>{comment}{head}").as_bytes(), body].concat()
        };
        let body = b"<p>Gr\xF6\xDFe</p>";
        for head in [
            "<meta charset=\"windows-1252\"><title>t</title>",
            "<title>a <meta> in a title</title>\n<link rel=stylesheet href=a.css>\n\
             <meta http-equiv=Content-Type content=\"text/html; charset=windows-1252\">",
            "<html><script>document.write('<p>')</script><meta charset=windows-1252>",
        ] {
            let d = html(&page(head, body));
            assert_eq!(
                (d.encoding, d.declared, d.lossy),
                ("windows-1252", Declared::Meta, false),
                "{head}"
            );
        }
        // Past the head: after text, after a body element, after `</head>`; in a script.
        for head in [
            "A sample: <meta charset=\"windows-1252\">",
            "<div><meta charset=\"windows-1252\"></div>",
            "<head></head><meta charset=\"windows-1252\">",
            "<head><script>var m = '<meta charset=\"windows-1252\">';</script></head>",
        ] {
            assert_eq!(
                html(&page(head, body)).declared,
                Declared::Fallback,
                "{head}"
            );
        }
    }

    #[test]
    fn a_replacement_encoding_is_refused_by_its_label_and_unknown_labels_are_kept() {
        for label in ["iso-2022-kr", "csiso2022kr", "hz-gb-2312", "iso-2022-cn"] {
            let page = format!("<meta charset=\"{label}\"><p>hello</p>");
            assert_eq!(
                decode(page.into_bytes(), Format::Html, UTF_8).unwrap_err(),
                Undecodable::Replacement {
                    label: label.into()
                }
            );
        }
        let e = decode(
            b"<meta http-equiv=content-type content='text/html; charset=hz-gb-2312'>x".to_vec(),
            Format::Html,
            UTF_8,
        )
        .unwrap_err();
        assert!(e.to_string().contains("`hz-gb-2312`"), "{e}");
        let d = html(b"<meta charset=\"latin-1\"><p>Gr\xF6\xDFe</p>");
        assert_eq!(
            (d.unknown_label.as_deref(), d.lossy),
            (Some("latin-1"), true)
        );
        // the replacement label is the one named, not an unknown one before it
        let e = decode(
            b"<meta charset=latin-1><meta charset=iso-2022-kr>x".to_vec(),
            Format::Html,
            UTF_8,
        )
        .unwrap_err();
        assert_eq!(
            e,
            Undecodable::Replacement {
                label: "iso-2022-kr".into()
            }
        );
        // a known declaration after an unknown one wins, and nothing is reported
        let d = html(b"<meta charset=\"latin-1\"><meta charset=latin1><p>Gr\xF6\xDFe</p>");
        assert_eq!((d.unknown_label, d.encoding), (None, "windows-1252"));
    }

    /// A page declaring `iso-8859-1` whose bytes are UTF-8 (re-saved under a stale
    /// declaration) is read as UTF-8 and said to be; real Latin-1 bytes and pure ASCII are read
    /// as declared. Before: `GrÃ¶ÃŸe`, no word (an audit).
    #[test]
    fn a_declared_single_byte_encoding_over_utf8_bytes_is_read_as_utf8() {
        let html = |bytes: &[u8]| decode(bytes.to_vec(), Format::Html, UTF_8).unwrap();
        let d = html("<meta charset=\"iso-8859-1\"><p>Die Größe – “quoted”</p>".as_bytes());
        assert_eq!(
            d.text,
            "<meta charset=\"iso-8859-1\"><p>Die Größe – “quoted”</p>"
        );
        assert_eq!(
            (d.encoding, d.utf8_over_declared),
            ("UTF-8", Some("windows-1252"))
        );
        let d = html(b"<?xml version=\"1.0\" encoding=\"ISO-8859-2\"?><p>\xE8\xE9</p>");
        assert_eq!((d.encoding, d.utf8_over_declared), ("ISO-8859-2", None));
        let d = html(b"<meta charset=iso-8859-1><p>Gr\xF6\xDFe</p>");
        assert_eq!(
            (d.text.as_str(), d.utf8_over_declared),
            ("<meta charset=iso-8859-1><p>Größe</p>", None)
        );
        let d = html(b"<meta charset=iso-8859-1><p>plain</p>");
        assert_eq!((d.encoding, d.utf8_over_declared), ("windows-1252", None));
    }

    /// A UTF-8 page under a stale `iso-8859-1` was read as UTF-8 only when every one of its
    /// bytes was valid: cut mid-character (crawl output) or with one stray byte, it became
    /// `GrÃ¶ÃŸe`, without a word (an audit). UTF-8 but for a few bad bytes is UTF-8, read
    /// lossily; legacy text with one accidental UTF-8 pair (`\xC3\xA9`) is legacy text.
    #[test]
    fn utf8_with_a_few_bad_bytes_under_a_stale_declaration_is_read_as_utf8() {
        let page = "<meta charset=\"iso-8859-1\"><p>Die Größe der Tabelle: Übersicht für \
                    Anfänger – “Zitat”.</p><p>Ende: Grüße</p>";
        let cut = &page.as_bytes()[..page.find("üße").expect("in page") + 1];
        let d = html(cut);
        assert_eq!(
            (d.encoding, d.utf8_over_declared, d.lossy),
            ("UTF-8", Some("windows-1252"), true)
        );
        assert!(d.text.contains("Die Größe") && d.text.ends_with("Ende: Gr\u{FFFD}"));
        let mut stray = page.as_bytes().to_vec();
        let at = page.find(": Grüße").expect("in page");
        stray.insert(at, 0xA0);
        let d = html(&stray);
        assert_eq!(
            (d.encoding, d.utf8_over_declared, d.lossy),
            ("UTF-8", Some("windows-1252"), true)
        );
        assert!(d.text.ends_with("Ende\u{FFFD}: Grüße</p>"), "{}", d.text);
        let legacy = html(b"<meta charset=iso-8859-1><p>Gr\xF6\xDFe f\xFCr M\xFCller \xC3\xA9</p>");
        assert_eq!(
            (
                legacy.text.as_str(),
                legacy.utf8_over_declared,
                legacy.lossy
            ),
            (
                "<meta charset=iso-8859-1><p>Größe für Müller Ã©</p>",
                None,
                false
            )
        );
        // The same test flags UTF-8 read with a legacy source `encoding`.
        let d = decode(
            cut[page.find("<p>").expect("p")..].to_vec(),
            Format::Plain,
            WINDOWS_1252,
        )
        .expect("text");
        assert!(d.utf8_under_legacy, "{d:?}");
    }

    /// UTF-8 text under a stale multi-byte declaration (`Shift_JIS`, `gbk`, `euc-kr`, `big5`,
    /// `euc-jp`, an XHTML page's XML declaration) was stored as garbled CJK: the rule for
    /// stale declarations held for single-byte ones only (an audit). UTF-8 with multi-byte
    /// characters is practically never real double-byte text; the real thing is read as
    /// declared.
    #[test]
    fn utf8_under_a_stale_multibyte_declaration_is_read_as_utf8() {
        let japanese = "東京の天気は晴れ。これは文書です。";
        for (label, text) in [
            ("Shift_JIS", japanese),
            ("euc-jp", japanese),
            ("gbk", "北京今天天气很好。这是一个文件。"),
            ("gb2312", "北京今天天气很好。这是一个文件。"),
            ("big5", "台北今天天氣很好。這是一個文件。"),
            ("euc-kr", "서울의 날씨는 맑습니다. 이것은 문서입니다."),
        ] {
            let encoding = Encoding::for_label(label.as_bytes()).expect("a label");
            let page = format!("<meta charset=\"{label}\"><p>{text}</p>");
            let d = html(page.as_bytes());
            assert_eq!(
                (d.text.as_str(), d.utf8_over_declared, d.lossy),
                (page.as_str(), Some(encoding.name()), false),
                "{label}"
            );
            let (legacy, _, unmappable) = encoding.encode(&page);
            assert!(!unmappable, "{label}");
            let d = html(&legacy);
            assert_eq!(
                (d.text.as_str(), d.encoding, d.utf8_over_declared),
                (page.as_str(), encoding.name(), None),
                "{label}"
            );
        }
        let xhtml = format!(
            "<?xml version=\"1.0\" encoding=\"Shift_JIS\"?><html \
             xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>{japanese}</p></body></html>"
        );
        let d = html(xhtml.as_bytes());
        assert_eq!(
            (d.text.as_str(), d.utf8_over_declared),
            (xhtml.as_str(), Some("Shift_JIS"))
        );
    }

    #[test]
    fn utf8_read_with_a_legacy_source_encoding_is_flagged() {
        let d = decode("Größe".as_bytes().to_vec(), Format::Plain, WINDOWS_1252).unwrap();
        assert!(d.utf8_under_legacy && d.text == "GrÃ¶ÃŸe", "{d:?}");
        let d = decode(b"Gr\xF6\xDFe".to_vec(), Format::Plain, WINDOWS_1252).unwrap();
        assert!(!d.utf8_under_legacy);
        let d = decode(b"plain ascii".to_vec(), Format::Plain, WINDOWS_1252).unwrap();
        assert!(!d.utf8_under_legacy);
        // ASCII under a UTF-16 setting is CJK garbage: flagged; real UTF-16 is not.
        for utf16 in [encoding_rs::UTF_16LE, encoding_rs::UTF_16BE] {
            let d = decode(b"plain ascii".to_vec(), Format::Plain, utf16).unwrap();
            assert!(d.not_utf16 && !d.utf8_under_legacy, "{d:?}");
        }
        let le: Vec<u8> = "plain".encode_utf16().flat_map(u16::to_le_bytes).collect();
        let d = decode(le, Format::Plain, encoding_rs::UTF_16LE).unwrap();
        assert!(
            !d.utf8_under_legacy && !d.not_utf16 && d.text == "plain",
            "{d:?}"
        );
    }

    /// windows-1252 German under a source `encoding: utf-16le` has no NUL byte (the NUL check
    /// never fires) and is not UTF-8: it was stored as CJK characters without a word (an
    /// audit). 8-bit text read as UTF-16 is flagged; real UTF-16 is not, CJK text without a
    /// single NUL byte (no ASCII character in it) included.
    #[test]
    fn eight_bit_text_read_as_utf16_is_flagged() {
        let german = "Der Käse und die Brötchen vom Müller im Café kosten wenig Geld.\n".repeat(20);
        let russian = "Съешь же ещё этих мягких французских булок, да выпей чаю.\n".repeat(20);
        for (bytes, utf16) in [
            (WINDOWS_1252.encode(&german).0, UTF_16LE),
            (WINDOWS_1252.encode(&german).0, UTF_16BE),
            (
                encoding_rs::ISO_8859_2
                    .encode("Příliš žluťoučký kůň úpěl ďábelské ódy.")
                    .0,
                UTF_16LE,
            ),
            (WINDOWS_1251.encode(&russian).0, UTF_16LE),
            (encoding_rs::KOI8_R.encode(&russian).0, UTF_16BE),
        ] {
            let d = decode(bytes.into_owned(), Format::Plain, utf16).expect("text");
            assert!(d.not_utf16, "{d:?}");
        }
        for text in [
            "東京の天気は晴れ。これは文書です。ひらがなとカタカナと漢字。",
            "北京今天天气很好。这是两个文件，“引号”……",
            "서울의날씨는맑습니다。이것은문서입니다。",
            "ぁあぃいぅうぇえぉおかがきぎくぐけげこごさざしじすず",
            "日本",
        ] {
            for (utf16, bytes) in [
                (
                    UTF_16LE,
                    text.encode_utf16()
                        .flat_map(u16::to_le_bytes)
                        .collect::<Vec<_>>(),
                ),
                (
                    UTF_16BE,
                    text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
                ),
            ] {
                assert!(!bytes.contains(&0), "{text}");
                let d = decode(bytes, Format::Plain, utf16).expect("text");
                assert_eq!(
                    (d.text.as_str(), d.not_utf16),
                    (text, false),
                    "{}",
                    utf16.name()
                );
            }
        }
        // A byte order mark decides, whatever the bytes after it.
        let mut bom = vec![0xFF, 0xFE];
        bom.extend(b"ab");
        assert!(!decode(bom, Format::Plain, UTF_8).expect("text").not_utf16);
    }
}
