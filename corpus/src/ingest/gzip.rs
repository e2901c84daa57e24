//! Gzip input, read as `zcat` and Python's `gzip` read it: one or more members (files joined
//! with `cat`), zero bytes after a member skipped (tape or block padding).

use std::io::{self, BufRead, Read};

use flate2::bufread::GzDecoder;

/// The decompressed bytes of a gzip file of one or more members. After a complete member come
/// another member, zero bytes (skipped: tape and block devices pad files so), or the end of
/// the file; anything else is an error that says so ("trailing data after the gzip stream"):
/// before, zero padding failed the run as "invalid gzip header", and other bytes after a
/// complete stream were called "unexpected end of file", as if it were cut short (an audit).
pub struct GzipMembers<R: BufRead> {
    /// The member being read; `None` once the stream has ended.
    member: Option<GzDecoder<R>>,
}

impl<R: BufRead> GzipMembers<R> {
    pub fn new(reader: R) -> Self {
        Self {
            member: Some(GzDecoder::new(reader)),
        }
    }
}

impl<R: BufRead> Read for GzipMembers<R> {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(member) = &mut self.member else {
                return Ok(0);
            };
            let n = member.read(into)?;
            if n > 0 || into.is_empty() {
                return Ok(n);
            }
            // The member is complete (its CRC and length checked).
            let Some(member) = self.member.take() else {
                return Ok(0);
            };
            let mut rest = member.into_inner();
            if another_member_follows(&mut rest)? {
                self.member = Some(GzDecoder::new(rest));
            }
        }
    }
}

/// After a complete member: skips zero bytes, then `true` when another member starts (its
/// first magic byte; its header is checked as it is read), `false` at the end of the file.
fn another_member_follows(rest: &mut impl BufRead) -> io::Result<bool> {
    loop {
        let buf = rest.fill_buf()?;
        let Some(&first) = buf.first() else {
            return Ok(false);
        };
        let zeros = buf.iter().take_while(|&&b| b == 0).count();
        if zeros == 0 {
            return match first {
                0x1f => Ok(true),
                _ => Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "trailing data after the gzip stream: its last member is whole, and bytes \
                     that are neither another member nor zero padding follow it (appended, or \
                     damaged, after compression); remove them",
                )),
            };
        }
        rest.consume(zeros);
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::io::Write;

    /// `bytes` gzip-compressed (one member).
    pub(in crate::ingest) fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(bytes).expect("gz");
        gz.finish().expect("gz")
    }

    fn read(bytes: &[u8]) -> io::Result<Vec<u8>> {
        // A small buffer, so that padding and members straddle its refills.
        let mut out = Vec::new();
        GzipMembers::new(io::BufReader::with_capacity(7, bytes)).read_to_end(&mut out)?;
        Ok(out)
    }

    /// As `zcat` and Python's `gzip` read it: members joined, zero padding after a member (or
    /// between two) skipped; other bytes after the stream named as such, a stream cut short as
    /// cut short.
    #[test]
    fn members_and_zero_padding_are_read_and_trailing_data_is_named() {
        let text = b"The quick brown fox jumps over the lazy dog.\n".repeat(100);
        let one = gzip(&text);
        assert_eq!(read(&one).expect("one member"), text);
        let two = [one.clone(), gzip(b"more")].concat();
        assert_eq!(read(&two).expect("two"), [&text[..], b"more"].concat());
        let padded = [one.clone(), vec![0; 512]].concat();
        assert_eq!(read(&padded).expect("zero padding"), text);
        let padded_between = [one.clone(), vec![0; 9], gzip(b"more"), vec![0; 3]].concat();
        assert_eq!(
            read(&padded_between).expect("padding between members"),
            [&text[..], b"more"].concat()
        );
        for tail in [&b"GARBAGE\n"[..], b"\0\0x"] {
            let err = read(&[one.clone(), tail.to_vec()].concat()).expect_err("trailing data");
            assert!(
                err.to_string()
                    .starts_with("trailing data after the gzip stream"),
                "{err}"
            );
        }
        let cut = read(&one[..one.len() - 3]).expect_err("cut short");
        assert_eq!(cut.kind(), io::ErrorKind::UnexpectedEof, "{cut}");
    }
}
