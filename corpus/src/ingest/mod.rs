//! Finding a source's files and reading them into documents.
//!
//! A `.txt`/`.md`/`.rst`/`.html` file is one document; a `.jsonl` file holds one document per
//! line. Any of them may be gzip-compressed (`.gz`). Files are read whole, so a single input
//! file should stay well under the machine's memory (corpora are usually many files). Bytes
//! become text in the encoding the file declares ([`encoding`]).

pub mod encoding;
mod gzip;
pub mod html;
mod jsonl;
mod xml_prolog;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use encoding_rs::Encoding;
use serde::Serialize;

use crate::error::{CorpusError, Result};
use crate::spec::SourceSpec;

/// The file types dapt reads, for messages.
pub const SUPPORTED_EXTENSIONS: &str =
    ".txt/.text/.md/.markdown/.rst, .jsonl/.ndjson, .html/.htm/.xhtml, each optionally .gz";

/// How many bad JSONL line numbers are kept per file for the report.
pub const BAD_LINES_KEPT: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Plain,
    Jsonl,
    Html,
}

/// One input file, with what identifies its content for "nothing changed" checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    pub path: PathBuf,
    pub format: Format,
    pub gzip: bool,
    pub size: u64,
    pub mtime_ns: u128,
}

/// The files of one source, and what a directory walk passed over.
#[derive(Debug, Default)]
pub struct Discovery {
    pub files: Vec<InputFile>,
    /// Files inside listed directories (or matched by globs) with an unsupported extension.
    pub skipped: Vec<PathBuf>,
}

/// Format from the file name; `None` for a type dapt does not read.
pub fn format_of(path: &Path) -> Option<(Format, bool)> {
    // The extension is ASCII; the rest of the name need not be UTF-8 (`caf\xe9.txt`).
    let name = path.file_name()?.to_string_lossy().to_ascii_lowercase();
    let (stem, gzip) = match name.strip_suffix(".gz") {
        Some(stem) => (stem.to_owned(), true),
        None => (name, false),
    };
    let ext = Path::new(&stem).extension()?.to_str()?;
    let format = match ext {
        "txt" | "text" | "md" | "markdown" | "rst" => Format::Plain,
        "jsonl" | "ndjson" => Format::Jsonl,
        "html" | "htm" | "xhtml" => Format::Html,
        _ => return None,
    };
    Some((format, gzip))
}

/// Whether `pattern` has a glob wildcard (`*`, `?`, `[`).
pub fn has_wildcards(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Expands a source's paths: files, directories (recursively) and glob patterns, sorted and
/// without repeats, so that the order (and hence the shards) does not depend on the file system.
/// A path that exists as written is that path, wildcard characters or not (`notes [draft].txt`);
/// [`CorpusSpec::resolve_paths`](crate::CorpusSpec::resolve_paths) escapes the job folder's own
/// characters in a glob.
///
/// A file found by walking a directory or matching a glob must lie inside that directory (the
/// glob's fixed leading directories) once symbolic links are resolved: a link out of the tree
/// is [`CorpusError::LinkOutsideTree`], naming it, never followed silently (a link to a secret
/// would be tokenized into the shards). A file named explicitly in `paths` is read wherever it
/// points.
pub fn discover(source: &SourceSpec) -> Result<Discovery> {
    let mut found = Discovery::default();
    let mut candidates: Vec<(PathBuf, bool)> = Vec::new(); // (path, named explicitly)
    for (i, pattern) in source.paths.iter().enumerate() {
        let before = candidates.len();
        let literal = source
            .literal
            .get(i)
            .copied()
            .unwrap_or_else(|| !has_wildcards(pattern));
        if !literal {
            let matches = glob::glob(pattern).map_err(|e| CorpusError::BadPattern {
                source_name: source.name.to_string(),
                pattern: pattern.clone(),
                message: e.to_string(),
            })?;
            for entry in matches {
                let path = entry.map_err(|e| CorpusError::Io {
                    path: e.path().to_path_buf(),
                    error: std::io::Error::new(e.error().kind(), e.error().to_string()),
                })?;
                push_path(&path, false, &mut candidates)?;
            }
            check_inside(&glob_root(pattern), &candidates[before..])?;
            let unmatchable = unmatchable_names(pattern);
            if candidates.len() == before && !unmatchable.is_empty() {
                return Err(CorpusError::NoMatch {
                    source_name: source.name.to_string(),
                    pattern: format!(
                        "{pattern} (but {} files there have names that are not UTF-8, which a \
                         glob cannot match, e.g. {}: name their folder instead)",
                        unmatchable.len(),
                        unmatchable[0].display()
                    ),
                });
            }
            found.skipped.extend(unmatchable);
        } else {
            let path = PathBuf::from(pattern);
            // A path that is not there names its source and place in the job file (it named
            // only the path: "No such file or directory").
            let meta = std::fs::metadata(&path).map_err(|error| CorpusError::MissingPath {
                source_name: source.name.to_string(),
                index: i,
                path: path.clone(),
                error,
            })?;
            if meta.is_dir() {
                push_path(&path, false, &mut candidates)?;
                check_inside(&path, &candidates[before..])?;
            } else {
                candidates.push((path, true));
            }
        }
        if candidates.len() == before {
            return Err(CorpusError::NoMatch {
                source_name: source.name.to_string(),
                pattern: pattern.clone(),
            });
        }
    }
    candidates.sort();
    candidates.dedup_by(|a, b| a.0 == b.0);
    for (path, explicit) in candidates {
        match format_of(&path) {
            Some((format, gzip)) => {
                let meta = match std::fs::metadata(&path) {
                    Ok(meta) => meta,
                    // A dangling link found in a folder (an editor's lock file `.#notes.md`)
                    // is passed over and counted; one named in `paths` is an error.
                    Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => {
                        found.skipped.push(path);
                        continue;
                    }
                    Err(e) => return Err(CorpusError::io(&path)(e)),
                };
                // A FIFO or a device would block the read or never end: dapt reads regular
                // files. Named in `paths` it is an error; found in a folder or by a glob it is
                // passed over and counted.
                if !meta.is_file() {
                    if explicit {
                        return Err(CorpusError::NotAFile { path });
                    }
                    found.skipped.push(path);
                    continue;
                }
                let mtime_ns = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                found.files.push(InputFile {
                    path,
                    format,
                    gzip,
                    size: meta.len(),
                    mtime_ns,
                });
            }
            None if explicit => return Err(CorpusError::UnsupportedFormat { path }),
            None => found.skipped.push(path),
        }
    }
    if found.files.is_empty() {
        return Err(CorpusError::NoMatch {
            source_name: source.name.to_string(),
            pattern: format!(
                "{} (no readable {} file)",
                source.paths.join(", "),
                SUPPORTED_EXTENSIONS
            ),
        });
    }
    Ok(found)
}

/// Files of a supported type in the folder of `pattern` (a glob whose wildcards are in its
/// last component only) that it would match but cannot: the `glob` crate matches only UTF-8
/// names, so `in/*.txt` passed over `caf\xe9.txt` without a word (an audit). Counted with the
/// skipped files, so the report names them; a directory in `paths` reads them.
fn unmatchable_names(pattern: &str) -> Vec<PathBuf> {
    let path = Path::new(pattern);
    let (Some(parent), Some(last)) = (path.parent(), path.file_name()) else {
        return Vec::new();
    };
    let Ok(matcher) = glob::Pattern::new(&last.to_string_lossy()) else {
        return Vec::new();
    };
    // The folder as the file system names it (the job folder's own characters are escaped in
    // the pattern: `p[[]v2]`), and only when the wildcards are in the last component.
    let folder = glob_root(&parent.to_string_lossy());
    if glob_root(pattern) != folder {
        return Vec::new();
    }
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_none())
        .filter(|e| matcher.matches(&e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .filter(|p| format_of(p).is_some())
        .collect();
    found.sort();
    found
}

/// The directories of a glob pattern before its first wildcard (`/data/*/x.txt` -> `/data`;
/// an escaped `[[]` is no wildcard: `/a/proj[[]v2]/*.txt` -> `/a/proj[v2]`).
fn glob_root(pattern: &str) -> PathBuf {
    let mut root = PathBuf::new();
    for part in Path::new(pattern).components() {
        match unescape(&part.as_os_str().to_string_lossy()) {
            Some(literal) => root.push(literal),
            None => break,
        }
    }
    if root.as_os_str().is_empty() {
        root.push(".");
    }
    root
}

/// The text a glob component matches when it is a literal (its wildcard characters escaped
/// as `glob::Pattern::escape` does: `[[]`, `[]]`, `[*]`, `[?]`); `None` when it has a wildcard.
fn unescape(component: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = component;
    while let Some(c) = rest.chars().next() {
        match c {
            '*' | '?' => return None,
            '[' => {
                let mut chars = rest.chars();
                chars.next();
                let escaped = chars.next()?;
                if !matches!(escaped, '[' | ']' | '*' | '?') || chars.next() != Some(']') {
                    return None;
                }
                out.push(escaped);
                rest = chars.as_str();
            }
            c => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    Some(out)
}

/// Refuses a found file whose real path (links resolved) is outside `root`'s.
fn check_inside(root: &Path, found: &[(PathBuf, bool)]) -> Result<()> {
    if found.is_empty() {
        // Nothing to check (a glob whose leading directories do not exist matches nothing,
        // which the caller names as such).
        return Ok(());
    }
    let real_root = root.canonicalize().map_err(CorpusError::io(root))?;
    for (path, _) in found {
        let real = match path.canonicalize() {
            Ok(real) => real,
            // A dangling link points nowhere to read: passed over later.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() => continue,
            Err(e) => return Err(CorpusError::io(path)(e)),
        };
        if !real.starts_with(&real_root) {
            return Err(CorpusError::LinkOutsideTree {
                link: path.clone(),
                target: real,
                root: root.to_path_buf(),
            });
        }
    }
    Ok(())
}

fn push_path(path: &Path, explicit: bool, out: &mut Vec<(PathBuf, bool)>) -> Result<()> {
    if path.is_dir() {
        for entry in walkdir::WalkDir::new(path).follow_links(true) {
            // A dangling link: its target cannot be read (the caller passes it over).
            if let Err(e) = &entry {
                let dangling = e.io_error().map(std::io::Error::kind)
                    == Some(std::io::ErrorKind::NotFound)
                    && e.path().is_some_and(|p| p.is_symlink());
                if let (true, Some(link)) = (dangling, e.path()) {
                    out.push((link.to_path_buf(), false));
                    continue;
                }
            }
            // A link to a folder above it (`sub/up -> ..`): that folder's files are read
            // already, so nothing is lost by not following it again (the run failed with a
            // bare "file system loop"; an audit).
            if entry
                .as_ref()
                .err()
                .and_then(walkdir::Error::loop_ancestor)
                .is_some()
            {
                continue;
            }
            let entry = entry.map_err(|e| CorpusError::Io {
                path: e.path().unwrap_or(path).to_path_buf(),
                error: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop")),
            })?;
            // Regular files, and what is neither a file nor a folder (a FIFO, a socket, a
            // device): the caller passes those over by name.
            if !entry.file_type().is_dir() {
                out.push((entry.into_path(), false));
            }
        }
    } else {
        out.push((path.to_path_buf(), explicit));
    }
    Ok(())
}

/// The documents of one file and what was wrong with it.
#[derive(Debug)]
pub struct FileText {
    pub documents: Vec<String>,
    /// The 1-based line of each document of a JSONL file (empty for other formats).
    pub lines: Vec<u64>,
    /// The name of the encoding the text was decoded from (`UTF-8`, `windows-1252`, ...).
    pub encoding: &'static str,
    /// Some bytes were not valid in that encoding and became U+FFFD.
    pub lossy: bool,
    /// Where the encoding came from: the file itself (its byte order mark, a `<meta>`, an XML
    /// declaration) or the source's setting.
    pub declared: encoding::Declared,
    /// A declared encoding label that names none (ignored; see [`encoding::Decoded`]).
    pub unknown_label: Option<String>,
    /// Valid UTF-8 with non-ASCII text, decoded with the source's legacy `encoding`.
    pub utf8_under_legacy: bool,
    /// The legacy encoding the file declares, when it was read as UTF-8 instead
    /// ([`encoding::Decoded::utf8_over_declared`]).
    pub utf8_over_declared: Option<&'static str>,
    /// 8-bit text decoded as UTF-16 by the source's `encoding`
    /// ([`encoding::Decoded::not_utf16`]).
    pub not_utf16: bool,
    /// Why an XHTML page could not be read as XML (it was read as HTML instead).
    pub not_xml: Option<String>,
    /// JSONL lines that were not JSON objects with a string `text_field`.
    pub bad_lines: u64,
    /// The first few of those line numbers (1-based).
    pub bad_line_numbers: Vec<u64>,
    /// Why the first of those was not read (serde_json's error: `expected value at line 1
    /// column 1`; or no object, no such field, not a string).
    pub first_bad_reason: Option<String>,
    /// Raw bytes read (after decompression).
    pub bytes: u64,
}

/// Reads one file into documents (not yet normalized). `fallback` is the encoding of a file
/// that declares none (see [`encoding::decode`]); `max_bytes` bounds its size after
/// decompression (`corpus.max_file_bytes`): past it, [`CorpusError::TooLarge`] names the file.
pub fn read_file(
    file: &InputFile,
    text_field: &str,
    fallback: &'static Encoding,
    max_bytes: u64,
) -> Result<FileText> {
    let raw = read_bounded(file, max_bytes)?;
    let bytes = raw.len() as u64;
    let decoded =
        encoding::decode(raw, file.format, fallback).map_err(|reason| CorpusError::NotText {
            path: file.path.clone(),
            reason: reason.after_decompression(file.gzip).to_string(),
        })?;
    let mut text = FileText {
        documents: Vec::new(),
        lines: Vec::new(),
        encoding: decoded.encoding,
        lossy: decoded.lossy,
        declared: decoded.declared,
        unknown_label: decoded.unknown_label,
        utf8_under_legacy: decoded.utf8_under_legacy,
        utf8_over_declared: decoded.utf8_over_declared,
        not_utf16: decoded.not_utf16,
        not_xml: None,
        bad_lines: 0,
        bad_line_numbers: Vec::new(),
        first_bad_reason: None,
        bytes,
    };
    let content = decoded.text;
    match file.format {
        Format::Plain => text.documents.push(content),
        Format::Html => {
            // XHTML read as XML needs no HTML nesting bound (its parser and the walk keep no
            // recursion, and `<span/>` opens nothing there).
            let xhtml =
                html::is_xhtml(&file.path, &content).then(|| html::extract_xhtml_text(&content));
            if let Some(Ok(xhtml)) = xhtml {
                text.documents.push(xhtml);
            } else {
                // XHTML that is not XML is read as HTML, said in the report, with its
                // self-closing tags expanded (`<iframe/>` would swallow the rest of the page).
                let content = match xhtml {
                    Some(Err(why)) => {
                        text.not_xml = Some(why);
                        html::self_closing_expanded(&content)
                    }
                    _ => std::borrow::Cow::Borrowed(content.as_str()),
                };
                let page = html::page_text(&content, html::MAX_NESTING).map_err(|_| {
                    CorpusError::NotText {
                        path: file.path.clone(),
                        reason: format!(
                            "its HTML elements nest more than {} deep: the HTML parser's time grows \
                             with the square of the depth (browsers stop at 512); fix or remove the \
                             page",
                            html::MAX_NESTING
                        ),
                    }
                })?;
                text.documents.push(page)
            }
        }
        Format::Jsonl => {
            // A JSON array of records (`json.dump(records)`, on one line or pretty-printed) is
            // no JSON Lines: its records were all lost, counted as one bad line (an audit).
            let start = content.trim_start_matches(|c: char| c == '\u{FEFF}' || c.is_whitespace());
            if start.starts_with('[') && jsonl::is_array_of_records(start) {
                return Err(array_of_records(&file.path, None));
            }
            // Records end at `\n`, `\r\n` or a lone `\r` (classic Mac line endings, or files of
            // both joined): JSON has no raw line break inside a record, so each is a record's
            // end. Read as one bad line, three `\r` records and a `\n` one were all lost.
            let lines = content
                .split('\n')
                .flat_map(|line| line.strip_suffix('\r').unwrap_or(line).split('\r'));
            for (i, line) in lines.enumerate() {
                // A byte order mark at a line's start (files joined with `cat`, gzip members
                // each with their own) is a signature, not JSON.
                let line = line.trim_start_matches('\u{FEFF}');
                if line.trim().is_empty() {
                    continue;
                }
                // A `\uD83D` without its pair (an emoji cut in half before `json.dumps`) is
                // no JSON to serde_json: U+FFFD takes its place and the file counts as lossy,
                // as for an invalid byte. Before, the record was dropped as "not a JSON object".
                // Python's `json.dumps` writes `NaN` and `Infinity` (a score field of a crawl):
                // read as null, as they are no text (the record was dropped as "not a JSON
                // object with a string text field", its text fine; an audit).
                // A record that is no JSON object with a string text field: serde_json's
                // reason for the first, for the report.
                let mut why = None;
                let parsed = match jsonl::record_text(line, text_field) {
                    Ok(doc) => Some(doc),
                    Err(reason) => {
                        if line.trim_start().starts_with('[') && jsonl::is_array_of_records(line) {
                            return Err(array_of_records(&file.path, Some(i as u64 + 1)));
                        }
                        why = Some(reason);
                        let constants = python_constants_as_null(line);
                        let line = constants.as_deref().unwrap_or(line);
                        match constants
                            .as_deref()
                            .and_then(|l| jsonl::record_text(l, text_field).ok())
                        {
                            Some(doc) => Some(doc),
                            None => lone_surrogates_replaced(line).and_then(|fixed| {
                                let doc = jsonl::record_text(&fixed, text_field).ok()?;
                                text.lossy = true;
                                Some(doc)
                            }),
                        }
                    }
                };
                match parsed {
                    Some(mut doc) => {
                        // An escaped `\u0000` is past the NUL check on the raw bytes: dropped
                        // here as a stray NUL there is, and the file counted as lossy.
                        if doc.contains('\0') {
                            doc.retain(|c| c != '\0');
                            text.lossy = true;
                        }
                        text.documents.push(doc);
                        text.lines.push(i as u64 + 1);
                    }
                    None => {
                        if text.bad_lines == 0 {
                            text.first_bad_reason = why;
                        }
                        text.bad_lines += 1;
                        if text.bad_line_numbers.len() < BAD_LINES_KEPT {
                            text.bad_line_numbers.push(i as u64 + 1);
                        }
                    }
                }
            }
        }
    }
    Ok(text)
}

/// About how many bytes `file` holds once decompressed, for grouping files into batches: a
/// gzip file's trailer gives its (last member's) size modulo 2^32; at least the file's size.
pub fn text_bytes_estimate(file: &InputFile) -> u64 {
    use std::io::{Seek, SeekFrom};
    if !file.gzip || file.size < 18 {
        return file.size;
    }
    let trailer = std::fs::File::open(&file.path).and_then(|mut f| {
        f.seek(SeekFrom::End(-4))?;
        let mut isize = [0u8; 4];
        f.read_exact(&mut isize)?;
        Ok(u32::from_le_bytes(isize))
    });
    trailer.map_or(file.size, |n| file.size.max(u64::from(n)))
}

/// The file's bytes, decompressed, reading at most `max_bytes + 1` of them: a gzip bomb stops
/// at the bound instead of filling memory.
fn read_bounded(file: &InputFile, max_bytes: u64) -> Result<Vec<u8>> {
    let opened = std::fs::File::open(&file.path).map_err(CorpusError::io(&file.path))?;
    let too_large = || CorpusError::TooLarge {
        path: file.path.clone(),
        limit: max_bytes,
    };
    let mut out = Vec::new();
    if file.gzip && file.size == 0 {
        // An empty file: no document, as Python's `gzip` reads it (zcat calls it cut short);
        // it failed the whole run, "not a valid gzip stream: unexpected end of file" (an
        // audit). A crawler's empty output is no damage.
    } else if file.gzip {
        let decoder = gzip::GzipMembers::new(std::io::BufReader::new(opened));
        decoder
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(|error| CorpusError::Gzip {
                path: file.path.clone(),
                error,
            })?;
    } else {
        let size = opened
            .metadata()
            .map_err(CorpusError::io(&file.path))?
            .len();
        if size > max_bytes {
            return Err(too_large());
        }
        opened
            .take(max_bytes.saturating_add(1))
            .read_to_end(&mut out)
            .map_err(CorpusError::io(&file.path))?;
    }
    if out.len() as u64 > max_bytes {
        return Err(too_large());
    }
    Ok(out)
}

/// `line` with each `\uXXXX` escape of a UTF-16 surrogate that is not half of a pair replaced
/// by `\uFFFD`; `None` when it has none (nothing to retry).
fn lone_surrogates_replaced(line: &str) -> Option<String> {
    fn unit(escape: &[u8]) -> Option<u16> {
        let hex = escape.strip_prefix(b"\\u")?.get(..4)?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    }
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let (mut i, mut start, mut changed) = (0, 0, false);
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        match unit(&bytes[i..]) {
            // (`unit` read six bytes: `i + 6` is in range.)
            Some(0xD800..=0xDBFF)
                if unit(&bytes[i + 6..]).is_some_and(|low| (0xDC00..=0xDFFF).contains(&low)) =>
            {
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out.push_str(&line[start..i]);
                out.push_str("\\uFFFD");
                i += 6;
                start = i;
                changed = true;
            }
            // Any other escape, `\\` included, is two characters at least: skip both.
            _ => i += 2,
        }
    }
    out.push_str(&line[start.min(line.len())..]);
    changed.then_some(out)
}

/// `line` with each `NaN`, `Infinity` and `-Infinity` outside a string (Python's JSON,
/// which no JSON parser reads) as `null`; `None` when it has none (nothing to retry).
fn python_constants_as_null(line: &str) -> Option<String> {
    const CONSTANTS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = line.as_bytes();
    let mut out = String::with_capacity(line.len());
    let (mut i, mut start, mut in_string, mut changed) = (0, 0, false, false);
    while i < bytes.len() {
        if in_string {
            match bytes[i] {
                b'\\' => i += 2,
                b'"' => {
                    in_string = false;
                    i += 1;
                }
                _ => i += 1,
            }
            continue;
        }
        if bytes[i] == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        // (Byte comparisons: `i` may be inside a character of a line that is no JSON.)
        match CONSTANTS
            .iter()
            .find(|c| bytes[i..].starts_with(c.as_bytes()))
        {
            Some(constant) => {
                out.push_str(&line[start..i]);
                out.push_str("null");
                i += constant.len();
                start = i;
                changed = true;
            }
            None => i += 1,
        }
    }
    out.push_str(&line[start.min(line.len())..]);
    changed.then_some(out)
}

/// A JSONL file (or its line `line`) that is one JSON array of records.
fn array_of_records(path: &Path, line: Option<u64>) -> CorpusError {
    let on_line = line.map(|l| format!(" on line {l}")).unwrap_or_default();
    CorpusError::NotText {
        path: path.to_path_buf(),
        reason: format!(
            "holds a JSON array of records{on_line}, not JSON Lines (one JSON object per \
             line): convert it, e.g. `jq -c '.[]' {} > records.jsonl`",
            path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::gzip::tests::gzip;
    use super::*;
    use encoding_rs::UTF_8;
    use std::io::Write;

    #[test]
    fn byte_order_marks_are_not_text_in_any_format_or_under_gzip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let jsonl = b"\xEF\xBB\xBF{\"text\":\"first\"}\r\n{\"text\":\"second\"}\r\n";
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(
            "{\"text\":\"first\"}\n{\"text\":\"second\"}\n"
                .encode_utf16()
                .flat_map(u16::to_le_bytes),
        );
        for (name, bytes) in [
            ("a.jsonl", jsonl.to_vec()),
            ("b.jsonl.gz", gzip(jsonl)),
            ("c.jsonl", utf16),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("write");
            let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
            assert_eq!(text.documents, vec!["first", "second"], "{name}");
            assert_eq!(text.bad_lines, 0, "{name}");
        }
        for name in ["d.md", "e.txt.gz", "f.rst", "g.html"] {
            let path = dir.path().join(name);
            let bytes = b"\xEF\xBB\xBF# Notes";
            let bytes = if name.ends_with(".gz") {
                gzip(bytes)
            } else {
                bytes.to_vec()
            };
            std::fs::write(&path, bytes).expect("write");
            let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
            assert_eq!(text.documents, vec!["# Notes"], "{name}");
        }
    }

    fn input(path: &Path) -> InputFile {
        let (format, gzip) = format_of(path).expect("known format");
        InputFile {
            path: path.to_path_buf(),
            format,
            gzip,
            size: std::fs::metadata(path).map_or(0, |m| m.len()),
            mtime_ns: 0,
        }
    }

    #[test]
    fn formats_by_extension() {
        assert_eq!(
            format_of(Path::new("a/b.TXT")),
            Some((Format::Plain, false))
        );
        assert_eq!(
            format_of(Path::new("x.jsonl.gz")),
            Some((Format::Jsonl, true))
        );
        assert_eq!(format_of(Path::new("p.html")), Some((Format::Html, false)));
        assert_eq!(format_of(Path::new("LICENSE")), None);
        assert_eq!(format_of(Path::new("a.pdf")), None);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_bound_and_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bomb.txt.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b'a'; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&zeros).expect("gz");
        }
        let bytes = gz.finish().expect("gz");
        assert!(bytes.len() < 1 << 18, "{} compressed bytes", bytes.len());
        std::fs::write(&path, bytes).expect("write");
        let err = read_file(&input(&path), "text", UTF_8, 1 << 20)
            .expect_err("64 MiB past a 1 MiB bound")
            .to_string();
        assert!(
            err.contains("bomb.txt.gz") && err.contains("max_file_bytes"),
            "{err}"
        );
        assert_eq!(
            read_file(&input(&path), "text", UTF_8, 64 << 20)
                .expect("within the bound")
                .bytes,
            64 << 20
        );
        let plain = dir.path().join("big.txt");
        std::fs::write(&plain, vec![b'b'; 2048]).expect("write");
        let err = read_file(&input(&plain), "text", UTF_8, 1024)
            .expect_err("plain file past the bound")
            .to_string();
        assert!(err.contains("big.txt"), "{err}");
    }

    #[test]
    fn links_out_of_the_tree_are_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("corpus");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        std::fs::write(tree.join("a.txt"), "a").expect("write");
        std::fs::write(dir.path().join("secret.txt"), "password").expect("write");
        // A link inside the tree is fine.
        std::os::unix::fs::symlink(tree.join("a.txt"), tree.join("sub/again.txt")).expect("ln");
        let source = |paths: Vec<String>| SourceSpec {
            name: crate::spec::SourceName::try_from("s".to_string()).expect("name"),
            role: crate::spec::Role::Domain,
            paths,
            weight: crate::spec::Weight(1.0),
            held_out: crate::spec::Fraction::default(),
            text_field: "text".into(),
            encoding: None,
            literal: Vec::new(),
        };
        let dir_source = source(vec![tree.display().to_string()]);
        assert_eq!(discover(&dir_source).expect("inside").files.len(), 2);
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), tree.join("sub/notes.txt"))
            .expect("ln");
        for s in [
            dir_source,
            source(vec![format!("{}/*/*.txt", tree.display())]),
        ] {
            let err = discover(&s).expect_err("link outside").to_string();
            assert!(
                err.contains("sub/notes.txt") && err.contains("secret.txt"),
                "{err}"
            );
        }
        // Named explicitly, the target is the user's choice.
        let named = source(vec![tree.join("sub/notes.txt").display().to_string()]);
        assert_eq!(discover(&named).expect("explicit").files.len(), 1);
    }

    #[test]
    fn a_gzip_files_text_size_is_estimated_from_its_trailer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.txt.gz");
        std::fs::write(&path, gzip(&vec![b'a'; 3 << 20])).expect("write");
        let file = input(&path);
        assert!(file.size < 100 << 10, "{}", file.size);
        assert_eq!(text_bytes_estimate(&file), 3 << 20);
        let plain = dir.path().join("p.txt");
        std::fs::write(&plain, "abc").expect("write");
        assert_eq!(text_bytes_estimate(&input(&plain)), 3);
    }

    #[test]
    fn html_nested_past_the_limit_is_refused_by_name_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("deep.html");
        std::fs::write(&path, "<p>text".to_owned() + &"<div>".repeat(200_000)).expect("write");
        let started = std::time::Instant::now();
        let err = read_file(&input(&path), "text", UTF_8, 1 << 30)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("deep.html") && err.contains("nest"), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20));
        for tag in ["<b>", "<span>", "<div><span>"] {
            std::fs::write(&path, format!("<p>text{}", tag.repeat(100_000))).expect("write");
            let started = std::time::Instant::now();
            let err = read_file(&input(&path), "text", UTF_8, 1 << 30)
                .expect_err("refused")
                .to_string();
            assert!(err.contains("nest more than 4096 deep"), "{tag}: {err}");
            assert!(started.elapsed() < std::time::Duration::from_secs(20));
        }
    }

    /// Legacy pages whose tags the HTML parser closes by itself are shallow, and read: the
    /// nesting estimate counted 4,100 unclosed `<a name>` anchors, or 5,000 paragraphs each
    /// opening a `<font>`, as 4,100 levels and refused the page, failing the run (an audit).
    #[test]
    fn legacy_pages_with_unclosed_anchors_and_fonts_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let anchors: String = (0..4_100)
            .map(|i| format!("<a name=s{i}>Section {i}<br>text<br>"))
            .collect();
        let fonts: String = (0..5_000)
            .map(|i| format!("<p><font face=Arial size=2>Paragraph {i} of an old page."))
            .collect();
        for (name, body, last) in [
            ("anchors.html", anchors, "Section 4099\ntext"),
            ("font.html", fonts, "Paragraph 4999 of an old page."),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("<html><body>{body}")).expect("write");
            let text = read_file(&input(&path), "text", UTF_8, 1 << 30)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(text.documents[0].ends_with(last), "{name}");
        }
    }

    #[test]
    fn jsonl_bad_lines_are_counted_with_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"text\":\"one\"}\nnot json\n\n{\"body\":\"x\"}\n{\"text\":2}\n{\"text\":\"two\"}\n",
        )
        .expect("write");
        let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
        assert_eq!(text.documents, vec!["one", "two"]);
        assert_eq!(text.lines, vec![1, 6]);
        assert_eq!(text.bad_lines, 3);
        assert_eq!(text.bad_line_numbers, vec![2, 4, 5]);
        assert!(!text.lossy);
        // Escaped NULs are dropped as raw ones are, and the file counted as lossy.
        std::fs::write(
            &path,
            "{\"text\":\"a\\u0000b\"}\n{\"text\":\"\\u0000\\u0000\"}\n",
        )
        .expect("write");
        let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
        assert_eq!(text.documents, vec!["ab", ""]);
        assert!(text.lossy);
    }

    /// A JSONL file that is one JSON array of records lost every record, counted as "1 line";
    /// records Python's `json` reads (nesting past 128, `1e400`) were dropped as not objects
    /// with a string text field (an audit).
    #[test]
    fn a_json_array_is_refused_and_records_python_reads_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("part-1.jsonl");
        let records = "[{\"text\": \"one\"}, {\"text\": \"two\"}]";
        let pretty = "\u{FEFF}[\n  {\n    \"text\": \"one\"\n  }\n]\n";
        let later = "{\"text\": \"zero\"}\n[{\"text\": \"one\"}]\n";
        for (content, line) in [(records, ""), (pretty, ""), (later, " on line 2")] {
            std::fs::write(&path, content).expect("write");
            let err = read_file(&input(&path), "text", UTF_8, 1 << 20)
                .expect_err("refused")
                .to_string();
            assert!(
                err.contains("part-1.jsonl")
                    && err.contains(&format!("a JSON array of records{line}, not JSON Lines"))
                    && err.contains("jq -c '.[]'"),
                "{err}"
            );
        }
        // An array of numbers, like any other line that is no record, is a bad line.
        let deep = format!("{}1{}", "{\"child\": ".repeat(200), "}".repeat(200));
        std::fs::write(
            &path,
            format!(
                "[1, 2]\n{{\"text\": \"deep AST\", \"ast\": {deep}}}\n\
                 {{\"text\": \"huge score\", \"score\": 1e400}}\n{{\"text\": 1e400}}\n"
            ),
        )
        .expect("write");
        let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
        assert_eq!(text.documents, ["deep AST", "huge score"]);
        assert_eq!(text.bad_line_numbers, [1, 4]);
        let why = text.first_bad_reason.expect("a reason");
        assert!(why.contains("expected a JSON object"), "{why}");
    }

    /// Gzip faults named for what they are (audits): a `.txt.gz` of gzip data again was told
    /// to "rename it to `*.gz`"; zero padding after the stream (read by `zcat` and Python's
    /// `gzip`) failed the run as "invalid gzip header"; other bytes after a complete stream
    /// were called "unexpected end of file".
    #[test]
    fn gzip_compressed_twice_padded_or_with_trailing_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = b"The quick brown fox jumps over the lazy dog.\n".repeat(100);
        let once = gzip(&text);
        let path = dir.path().join("a.txt.gz");
        let read = |bytes: &[u8]| {
            std::fs::write(&path, bytes).expect("write");
            read_file(&input(&path), "text", UTF_8, 1 << 20).map_err(|e| e.to_string())
        };
        let err = read(&gzip(&once)).expect_err("compressed twice");
        assert!(
            err.contains("a.txt.gz") && err.contains("compressed twice") && !err.contains("rename"),
            "{err}"
        );
        let padded = read(&[once.clone(), vec![0; 512]].concat()).expect("zero padding");
        assert_eq!(padded.documents, vec![String::from_utf8_lossy(&text)]);
        let err = read(&[once, b"GARBAGE\n".to_vec()].concat()).expect_err("trailing data");
        assert!(
            err.contains("a.txt.gz") && err.contains("trailing data after the gzip stream"),
            "{err}"
        );
        // An empty file is no document, as Python's gzip reads it (it failed the run).
        let empty = read(&[]).expect("an empty .gz");
        assert!(empty.documents.iter().all(String::is_empty), "{empty:?}");
    }

    #[test]
    fn gzip_and_invalid_utf8() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.txt.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"caf\xe9 au lait").expect("gz");
        std::fs::write(&path, gz.finish().expect("gz")).expect("write");
        let text = read_file(&input(&path), "text", UTF_8, 1 << 20).expect("read");
        assert!(text.lossy);
        assert_eq!(text.documents, vec!["caf\u{fffd} au lait"]);

        let broken = dir.path().join("broken.txt.gz");
        std::fs::write(&broken, b"\x1f\x8b\x08\x00garbage").expect("write");
        let err = read_file(&input(&broken), "text", UTF_8, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.txt.gz") && err.contains("gzip"),
            "{err}"
        );
    }
}
