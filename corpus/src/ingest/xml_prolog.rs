//! What an XML document's prolog holds, read from its bytes: where an XML declaration starts
//! and whether the root element is XHTML. The prolog (comments, processing instructions, a
//! document type declaration) has no length bound, so neither has this reading: a fixed window
//! (the first 4 KiB) missed the namespace of an EPUB chapter after a long licence comment, and
//! the page was read as HTML5, where its `<script/>` swallowed the rest of it (an audit).
//!
//! The bytes are those of a file in any ASCII-compatible encoding (the prolog is ASCII).

/// The XHTML namespace, as the root element of an XHTML page declares it.
pub const XHTML_NAMESPACE: &[u8] = b"http://www.w3.org/1999/xhtml";

/// XML's whitespace (`S`: space, tab, carriage return, line feed).
fn xml_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// How many whitespace bytes `bytes` starts with.
pub fn leading_space(bytes: &[u8]) -> usize {
    bytes.iter().take_while(|&&b| xml_space(b)).count()
}

/// Whether `bytes` open with an XML declaration (`<?xml`), after any whitespace: XML allows
/// none before it, but a template's stray line break is common and says nothing.
pub fn opens_with_xml_declaration(bytes: &[u8]) -> bool {
    bytes[leading_space(bytes)..].starts_with(b"<?xml")
}

/// Whether the root element's start tag names the XHTML namespace (the prolog before it, a
/// comment that mentions the namespace, does not count).
pub fn root_is_xhtml(bytes: &[u8]) -> bool {
    root_start_tag(bytes).is_some_and(|(start, end)| find(&bytes[start..end], XHTML_NAMESPACE))
}

fn find(bytes: &[u8], needle: &[u8]) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// The position just past the first `needle` at or after `from`.
fn past(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|i| from + i + needle.len())
}

/// Where the root element's start tag is, from its `<` to just past its `>`: after whitespace,
/// processing instructions (the XML declaration among them), comments and a document type
/// declaration (its internal subset and quoted strings may hold `>`). `None` when something
/// else comes first (text: not XML) or the bytes end before the tag does.
pub fn root_start_tag(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut pos = 0;
    loop {
        pos += leading_space(&bytes[pos..]);
        let rest = &bytes[pos..];
        if rest.starts_with(b"<?") {
            pos = past(bytes, pos + 2, b"?>")?;
        } else if rest.starts_with(b"<!--") {
            pos = past(bytes, pos + 4, b"-->")?;
        } else if rest.len() >= 9 && rest[..9].eq_ignore_ascii_case(b"<!DOCTYPE") {
            pos = markup_end(bytes, pos + 9, true)?;
        } else if rest.first() == Some(&b'<')
            && rest
                .get(1)
                .is_some_and(|&c| c.is_ascii_alphabetic() || c == b'_' || c == b':' || c >= 0x80)
        {
            return Some((pos, markup_end(bytes, pos + 1, false)?));
        } else {
            return None;
        }
    }
}

/// The position just past the `>` that ends the markup from `from`: not one inside quotes,
/// nor (in a document type declaration, `subset`) inside its `[...]`.
fn markup_end(bytes: &[u8], from: usize, subset: bool) -> Option<usize> {
    let mut quote = None;
    let mut in_subset = false;
    for (i, &b) in bytes.iter().enumerate().skip(from) {
        match (quote, b) {
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'"' | b'\'') => quote = Some(b),
            (None, b'[') if subset => in_subset = true,
            (None, b']') if subset => in_subset = false,
            (None, b'>') if !in_subset => return Some(i + 1),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An EPUB chapter's licence comment ran past the 4 KiB the namespace was looked for in:
    /// read as HTML5, its `<script/>` swallowed the page (an audit). Whatever the prolog holds,
    /// the root element decides.
    #[test]
    fn the_root_element_decides_however_long_the_prolog() {
        let page = |prolog: &str, root: &str| {
            format!("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n{prolog}{root}<body/></html>")
        };
        let xhtml = "<html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\">";
        let licence = format!("<!-- {} -->\n", "licence text > with markup ".repeat(400));
        let doctype = "<!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.1//EN\" \
                       \"http://www.w3.org/TR/xhtml11/DTD/xhtml11.dtd\">\n";
        assert!(licence.len() > 4096);
        let subset = "<!DOCTYPE html [ <!ENTITY a \"<b>\"> ]>";
        let stylesheet = "<?xml-stylesheet href=\"a.css\" type=\"text/css\"?>\r\n";
        for prolog in [
            String::new(),
            licence.clone(),
            format!("{licence}{doctype}{stylesheet}"),
            subset.to_owned(),
        ] {
            assert!(root_is_xhtml(page(&prolog, xhtml).as_bytes()), "{prolog}");
            assert!(!root_is_xhtml(page(&prolog, "<html>").as_bytes()));
        }
        // The namespace in a comment, or in an element after the root, is not the root's.
        let comment = "<?xml version=\"1.0\"?><!-- http://www.w3.org/1999/xhtml --><html/>";
        assert!(!root_is_xhtml(comment.as_bytes()));
        let feed = "<?xml version=\"1.0\"?><feed xmlns=\"http://www.w3.org/2005/Atom\">\
                    <content><div xmlns=\"http://www.w3.org/1999/xhtml\">x</div></content></feed>";
        assert!(!root_is_xhtml(feed.as_bytes()));
        // Text before the root, or a page cut inside the prolog, is no XML.
        assert!(!root_is_xhtml(
            b"<?xml version=\"1.0\"?>text<html xmlns=\"http://www.w3.org/1999/xhtml\">"
        ));
        assert_eq!(root_start_tag(b"<?xml version=\"1.0\"?><!-- cut"), None);
        assert_eq!(root_start_tag(b"<!-- c --> <a title='>'>"), Some((11, 24)));
    }

    #[test]
    fn an_xml_declaration_may_follow_whitespace() {
        assert!(opens_with_xml_declaration(b"\r\n  <?xml version=\"1.0\"?>"));
        assert!(!opens_with_xml_declaration(b"x<?xml version=\"1.0\"?>"));
        assert_eq!(leading_space(b" \n\t<?xml"), 3);
    }
}
