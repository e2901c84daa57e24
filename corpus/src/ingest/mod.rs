//! Finding a source's files and reading them into documents.
//!
//! A `.txt`/`.md`/`.rst`/`.html` file is one document; a `.jsonl` file holds one document per
//! line. Any of them may be gzip-compressed (`.gz`). Files are read whole, so a single input
//! file should stay well under the machine's memory (corpora are usually many files). Bytes
//! become text in the encoding the file declares ([`encoding`]).

pub mod encoding;
pub mod html;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use encoding_rs::Encoding;
use serde::Serialize;

use crate::error::{CorpusError, Result};
use crate::spec::SourceSpec;

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
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
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

/// Expands a source's paths: files, directories (recursively) and glob patterns, sorted and
/// without repeats, so that the order (and hence the shards) does not depend on the file system.
pub fn discover(source: &SourceSpec) -> Result<Discovery> {
    let mut found = Discovery::default();
    let mut candidates: Vec<(PathBuf, bool)> = Vec::new(); // (path, named explicitly)
    for pattern in &source.paths {
        let before = candidates.len();
        if pattern.contains(['*', '?', '[']) {
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
        } else {
            let path = PathBuf::from(pattern);
            let meta = std::fs::metadata(&path).map_err(CorpusError::io(&path))?;
            if meta.is_dir() {
                push_path(&path, false, &mut candidates)?;
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
                let meta = std::fs::metadata(&path).map_err(CorpusError::io(&path))?;
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
                "{} (no readable .txt/.md/.rst/.jsonl/.html file)",
                source.paths.join(", ")
            ),
        });
    }
    Ok(found)
}

fn push_path(path: &Path, explicit: bool, out: &mut Vec<(PathBuf, bool)>) -> Result<()> {
    if path.is_dir() {
        for entry in walkdir::WalkDir::new(path).follow_links(true) {
            let entry = entry.map_err(|e| CorpusError::Io {
                path: e.path().unwrap_or(path).to_path_buf(),
                error: e
                    .into_io_error()
                    .unwrap_or_else(|| std::io::Error::other("file system loop")),
            })?;
            if entry.file_type().is_file() {
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
    /// The encoding the text was decoded from.
    pub encoding: &'static Encoding,
    /// Some bytes were not valid in that encoding and became U+FFFD.
    pub lossy: bool,
    /// JSONL lines that were not JSON objects with a string `text_field`.
    pub bad_lines: u64,
    /// The first few of those line numbers (1-based).
    pub bad_line_numbers: Vec<u64>,
    /// Raw bytes read (after decompression).
    pub bytes: u64,
}

/// Reads one file into documents (not yet normalized). `fallback` is the encoding of a file
/// that declares none (see [`encoding::decode`]).
pub fn read_file(
    file: &InputFile,
    text_field: &str,
    fallback: &'static Encoding,
) -> Result<FileText> {
    let raw = std::fs::read(&file.path).map_err(CorpusError::io(&file.path))?;
    let raw = if file.gzip {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|error| CorpusError::Gzip {
                path: file.path.clone(),
                error,
            })?;
        out
    } else {
        raw
    };
    let bytes = raw.len() as u64;
    let decoded = encoding::decode(raw, file.format, fallback);
    let mut text = FileText {
        documents: Vec::new(),
        lines: Vec::new(),
        encoding: decoded.encoding,
        lossy: decoded.lossy,
        bad_lines: 0,
        bad_line_numbers: Vec::new(),
        bytes,
    };
    let content = decoded.text;
    match file.format {
        Format::Plain => text.documents.push(content),
        Format::Html => text.documents.push(html::extract_text(&content)),
        Format::Jsonl => {
            for (i, line) in content.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                match jsonl_text(line, text_field) {
                    Some(doc) => {
                        text.documents.push(doc);
                        text.lines.push(i as u64 + 1);
                    }
                    None => {
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

fn jsonl_text(line: &str, field: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(line).ok()? {
        serde_json::Value::Object(mut map) => match map.remove(field)? {
            serde_json::Value::String(s) => Some(s),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use encoding_rs::UTF_8;
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).expect("gz");
        gz.finish().expect("gz")
    }

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
            let text = read_file(&input(&path), "text", UTF_8).expect("read");
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
            let text = read_file(&input(&path), "text", UTF_8).expect("read");
            assert_eq!(text.documents, vec!["# Notes"], "{name}");
        }
    }

    fn input(path: &Path) -> InputFile {
        let (format, gzip) = format_of(path).expect("known format");
        InputFile {
            path: path.to_path_buf(),
            format,
            gzip,
            size: 0,
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
    fn jsonl_bad_lines_are_counted_with_numbers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.jsonl");
        std::fs::write(
            &path,
            "{\"text\":\"one\"}\nnot json\n\n{\"body\":\"x\"}\n{\"text\":2}\n{\"text\":\"two\"}\n",
        )
        .expect("write");
        let text = read_file(&input(&path), "text", UTF_8).expect("read");
        assert_eq!(text.documents, vec!["one", "two"]);
        assert_eq!(text.lines, vec![1, 6]);
        assert_eq!(text.bad_lines, 3);
        assert_eq!(text.bad_line_numbers, vec![2, 4, 5]);
    }

    #[test]
    fn gzip_and_invalid_utf8() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.txt.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"caf\xe9 au lait").expect("gz");
        std::fs::write(&path, gz.finish().expect("gz")).expect("write");
        let text = read_file(&input(&path), "text", UTF_8).expect("read");
        assert!(text.lossy);
        assert_eq!(text.documents, vec!["caf\u{fffd} au lait"]);

        let broken = dir.path().join("broken.txt.gz");
        std::fs::write(&broken, b"\x1f\x8b\x08\x00garbage").expect("write");
        let err = read_file(&input(&broken), "text", UTF_8)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("broken.txt.gz") && err.contains("gzip"),
            "{err}"
        );
    }
}
