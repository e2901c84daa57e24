//! A JSONL record's text field, and what makes a file no JSON Lines at all.
//!
//! A record is read without building it: only the text field is taken, every other field is
//! skipped unparsed (serde's `IgnoredAny`, which serde_json walks without recursion and without
//! converting numbers). So a record that Python's `json` reads is not dropped for what
//! serde_json's `Value` cannot hold: an AST nested deeper than 128 levels, a number past `f64`
//! (`1e400`) in a score field (an audit: both were dropped as "not a JSON object").

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// The string `field` of the JSON object `line`, or why there is none: serde_json's error for
/// what is no JSON ("expected value at line 1 column 1", "trailing characters ...", "number out
/// of range" in the text field), or that it is no object, lacks the field, or holds another
/// type there.
pub fn record_text(line: &str, field: &str) -> Result<String, String> {
    let mut de = serde_json::Deserializer::from_str(line);
    let found = TextField(field)
        .deserialize(&mut de)
        .and_then(|found| de.end().map(|()| found))
        .map_err(|e| e.to_string())?;
    match found {
        Found::Text(text) => Ok(text),
        Found::Missing => Err(format!("a JSON object without a `{field}` field")),
        Found::NotAString => Err(format!("its `{field}` is not a string")),
    }
}

/// Whether `text` (a line, or a whole file) is one JSON array holding objects: records written
/// with `json.dump(records)` instead of one per line.
/// Read as a stream, nothing kept: a whole file may be such an array.
pub fn is_array_of_records(text: &str) -> bool {
    if !text.trim_start().starts_with('[') {
        return false;
    }
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_seq(ArrayOfRecords)
        .is_ok_and(|records| records)
        && de.end().is_ok()
}

/// Whether a JSON array holds an object.
struct ArrayOfRecords;

impl<'de> Visitor<'de> for ArrayOfRecords {
    type Value = bool;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let mut records = false;
        while let Some(item) = seq.next_element::<MaybeString>()? {
            records |= item.1;
        }
        Ok(records)
    }
}

/// What a record holds under the text field (the last of the name, as a JSON object reads).
enum Found {
    Text(String),
    Missing,
    NotAString,
}

/// Reads a JSON object's `.0` field.
struct TextField<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for TextField<'_> {
    type Value = Found;
    fn deserialize<D: Deserializer<'de>>(self, de: D) -> Result<Found, D::Error> {
        de.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TextField<'_> {
    type Value = Found;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "a JSON object with a string `{}` field", self.0)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let mut found = Found::Missing;
        while let Some(key) = map.next_key::<String>()? {
            if key == self.0 {
                found = match map.next_value::<MaybeString>()?.0 {
                    Some(text) => Found::Text(text),
                    None => Found::NotAString,
                };
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// A JSON value that is a string, or `None` for any other (consumed), and whether it is an
/// object.
struct MaybeString(Option<String>, bool);

impl<'de> serde::Deserialize<'de> for MaybeString {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        de.deserialize_any(MaybeStringVisitor)
    }
}

struct MaybeStringVisitor;

impl<'de> Visitor<'de> for MaybeStringVisitor {
    type Value = MaybeString;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E>(self, v: &str) -> Result<MaybeString, E> {
        Ok(MaybeString(Some(v.to_owned()), false))
    }
    fn visit_string<E>(self, v: String) -> Result<MaybeString, E> {
        Ok(MaybeString(Some(v), false))
    }
    fn visit_bool<E>(self, _: bool) -> Result<MaybeString, E> {
        Ok(MaybeString(None, false))
    }
    fn visit_i64<E>(self, _: i64) -> Result<MaybeString, E> {
        Ok(MaybeString(None, false))
    }
    fn visit_u64<E>(self, _: u64) -> Result<MaybeString, E> {
        Ok(MaybeString(None, false))
    }
    fn visit_f64<E>(self, _: f64) -> Result<MaybeString, E> {
        Ok(MaybeString(None, false))
    }
    fn visit_unit<E>(self) -> Result<MaybeString, E> {
        Ok(MaybeString(None, false))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MaybeString, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(MaybeString(None, false))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<MaybeString, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(MaybeString(None, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records Python's `json` reads that serde_json's `Value` refused (an audit): nesting past
    /// 128 levels, a number past f64, in a field other than the text.
    #[test]
    fn records_python_reads_are_read() {
        let deep = format!("{}1{}", "{\"child\": ".repeat(200), "}".repeat(200));
        let line = format!("{{\"text\": \"deep AST\", \"ast\": {deep}}}");
        assert!(serde_json::from_str::<serde_json::Value>(&line).is_err());
        assert_eq!(record_text(&line, "text").as_deref(), Ok("deep AST"));
        let line = "{\"score\": 1e400, \"text\": \"huge score\", \"n\": -1e-400}";
        assert!(serde_json::from_str::<serde_json::Value>(line).is_err());
        assert_eq!(record_text(line, "text").as_deref(), Ok("huge score"));
        // the last of a repeated name, as a JSON object reads
        let line = "{\"text\": 1, \"text\": \"second\"}";
        assert_eq!(record_text(line, "text").as_deref(), Ok("second"));
    }

    /// What is not a record says why, serde_json's own words for what is no JSON.
    #[test]
    fn a_line_that_is_no_record_says_why() {
        let why = |line: &str| record_text(line, "text").expect_err(line);
        assert!(
            why("garbage").contains("expected value"),
            "{}",
            why("garbage")
        );
        assert!(why("{\"text\": \"a\"} x").contains("trailing characters"));
        assert!(
            why("[1, 2]").contains("expected a JSON object"),
            "{}",
            why("[1, 2]")
        );
        assert_eq!(
            why("{\"body\": \"x\"}"),
            "a JSON object without a `text` field"
        );
        assert_eq!(
            why("{\"text\": {\"a\": [1]}}"),
            "its `text` is not a string"
        );
        // nesting is skipped without a depth limit, even under the text field
        let deep = format!("{}\"x\"{}", "[".repeat(200), "]".repeat(200));
        let line = format!("{{\"text\": {deep}}}");
        assert_eq!(why(&line), "its `text` is not a string");
        assert!(why("{\"text\": 1e400}").contains("number out of range"));
    }

    #[test]
    fn an_array_of_records_is_told_apart() {
        assert!(is_array_of_records(
            "[{\"text\": \"a\"}, {\"text\": \"b\"}]"
        ));
        assert!(is_array_of_records("[\n  {\n    \"text\": \"a\"\n  }\n]\n"));
        assert!(!is_array_of_records("[1, 2]"));
        assert!(!is_array_of_records("{\"text\": \"a\"}"));
        assert!(!is_array_of_records("[{\"text\": \"a\"}"));
    }
}
