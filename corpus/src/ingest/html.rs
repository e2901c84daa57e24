//! Text of an HTML page, through a real HTML5 parser (html5ever, via `scraper`).
//!
//! Navigation, scripts and styles are skipped; block elements become line breaks; whitespace
//! inside running text collapses as a browser would show it, but `<pre>` keeps its layout
//! (code blocks matter in technical documentation). DocBook's `navheader` / `navfooter`
//! (the PostgreSQL manual's page chrome) count as navigation.

use ego_tree::NodeRef;
use scraper::{Html, Node};

const SKIPPED: &[&str] = &[
    "head", "script", "style", "noscript", "template", "nav", "svg", "iframe", "object",
];
/// Table cells: a tab between them, so that neighbouring cells' words never run together.
const CELLS: &[&str] = &["td", "th"];
const SKIPPED_CLASSES: &[&str] = &["navheader", "navfooter", "navigation"];
const BLOCKS: &[&str] = &[
    "p",
    "div",
    "br",
    "li",
    "ul",
    "ol",
    "dl",
    "dt",
    "dd",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "table",
    "tr",
    "blockquote",
    "section",
    "article",
    "header",
    "footer",
    "main",
    "aside",
    "figure",
    "figcaption",
    "hr",
    "title",
    "caption",
];

/// The deepest element nesting a page may have. html5ever's tree builder searches its stack
/// of open elements for each tag, so its time grows with depth squared (100,000 nested
/// `<div>`s took minutes); browsers cap the tree at 512 levels (Blink), real pages stay far
/// below, so a page past this is generated junk or hostile.
pub const MAX_NESTING: usize = 4096;

/// Elements that never hold others (`<br>`), or whose end tag is optional and implied by the
/// next sibling (`<p>`, `<li>`): not counted as nesting.
const NOT_NESTING: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
    "track", "wbr", "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "tbody",
    "thead", "tfoot", "colgroup", "rb", "rt", "rp", "rtc", "html", "head", "body",
];

/// How deep the page's elements nest, estimated in linear time from html5ever's tokenizer
/// alone: a start tag pushes its name, an end tag pops down to the open element of its name
/// (as the tree builder closes what is left open inside it), an end tag with no such open
/// element is ignored. Stops reading (in 64 KiB pieces) once past `limit`.
pub fn nesting_depth(html: &str, limit: usize) -> usize {
    use html5ever::tokenizer::{
        states::RawKind, BufferQueue, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer,
        TokenizerOpts,
    };
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    #[derive(Default)]
    struct Depth {
        open: RefCell<Vec<String>>,
        count: RefCell<HashMap<String, usize>>,
        deepest: Cell<usize>,
    }
    impl TokenSink for Depth {
        type Handle = ();
        fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
            let Token::TagToken(tag) = token else {
                return TokenSinkResult::Continue;
            };
            let name: &str = &tag.name;
            let (mut open, mut count) = (self.open.borrow_mut(), self.count.borrow_mut());
            // `/>` closes an element only in SVG and MathML: in HTML `<div/>` opens a div.
            let foreign = count.get("svg").is_some_and(|&n| n > 0)
                || count.get("math").is_some_and(|&n| n > 0);
            let closes_itself = tag.self_closing && foreign;
            match tag.kind {
                TagKind::StartTag if !closes_itself && !NOT_NESTING.contains(&name) => {
                    open.push(name.to_owned());
                    *count.entry(name.to_owned()).or_default() += 1;
                    self.deepest.set(self.deepest.get().max(open.len()));
                }
                TagKind::EndTag if count.get(name).is_some_and(|&n| n > 0) => {
                    while let Some(top) = open.pop() {
                        if let Some(n) = count.get_mut(&top) {
                            *n -= 1;
                        }
                        if top == name {
                            break;
                        }
                    }
                }
                _ => {}
            }
            // The text of these is not markup: the tree builder switches the tokenizer so.
            match (tag.kind, name) {
                (TagKind::StartTag, "script") => TokenSinkResult::RawData(RawKind::ScriptData),
                (TagKind::StartTag, "style" | "xmp" | "iframe" | "noembed" | "noframes") => {
                    TokenSinkResult::RawData(RawKind::Rawtext)
                }
                (TagKind::StartTag, "textarea" | "title") => {
                    TokenSinkResult::RawData(RawKind::Rcdata)
                }
                (TagKind::StartTag, "plaintext") => TokenSinkResult::Plaintext,
                _ => TokenSinkResult::Continue,
            }
        }
    }

    let tokenizer = Tokenizer::new(Depth::default(), TokenizerOpts::default());
    let input = BufferQueue::default();
    // Fed in pieces so that a page past the limit stops early.
    let mut rest = html;
    while !rest.is_empty() && tokenizer.sink.deepest.get() <= limit {
        let mut cut = rest.len().min(64 << 10);
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        input.push_back(rest[..cut].into());
        rest = &rest[cut..];
        let _ = tokenizer.feed(&input);
    }
    tokenizer.end();
    tokenizer.sink.deepest.get()
}

/// The visible text of `html`, paragraphs separated by blank lines.
pub fn extract_text(html: &str) -> String {
    let document = Html::parse_document(html);
    visible_text(document.tree.root(), html.len() / 2)
}

/// Whether a page is XHTML, to be read as XML: a `.xhtml` file, or one that opens with an XML
/// declaration and names the XHTML namespace. Read as HTML5, its `<title/>`, `<script/>` or
/// `<iframe/>` open an element that swallows the rest of the page, and CDATA becomes a comment
/// (an audit: EPUB chapters lost all their text, without a word).
pub fn is_xhtml(path: &std::path::Path, text: &str) -> bool {
    let head = text.get(..text.len().min(4096)).unwrap_or(text);
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("xhtml"))
        || (text.trim_start().starts_with("<?xml") && head.contains("http://www.w3.org/1999/xhtml"))
}

/// The visible text of an XHTML page read as XML, by the rules of [`extract_text`]; `None` when
/// it is not well-formed XML (the caller reads it as HTML, as a lenient reader would). HTML's
/// named character references that XML does not define (`&nbsp;`, `&mdash;`: an XHTML DTD
/// defines them, and no DTD is fetched) are read as HTML reads them.
///
/// A document type declaration is dropped unread; one with an internal subset (`[...]`, where
/// entities are declared) sends the page to the HTML reader, which ignores them: expanded, a
/// few kilobytes of entity references can ask for terabytes of text.
pub fn extract_xhtml_text(text: &str) -> Option<String> {
    let text = without_doctype(text)?;
    let text = html_entities_as_numbers(&text);
    let document = roxmltree::Document::parse(&text).ok()?;
    Some(visible_text(document.root(), text.len() / 2))
}

/// `text` without its `<!DOCTYPE ...>` (XML's case); `None` when the declaration has an internal
/// subset or does not end.
fn without_doctype(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    let Some(start) = text.find("<!DOCTYPE") else {
        return Some(std::borrow::Cow::Borrowed(text));
    };
    let length = text[start..].find('>')?;
    let declaration = &text[start..start + length];
    if declaration.contains('[') {
        return None;
    }
    Some(std::borrow::Cow::Owned(format!(
        "{}{}",
        &text[..start],
        &text[start + length + 1..]
    )))
}

/// `text` with each `&name;` that HTML defines and XML does not (all but `lt`, `gt`, `amp`,
/// `apos`, `quot`) as numeric references, outside CDATA sections.
fn html_entities_as_numbers(text: &str) -> std::borrow::Cow<'_, str> {
    use html5ever::data::NAMED_ENTITIES;
    if !text.contains('&') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(['&', '<']) {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(cdata) = rest.strip_prefix("<![CDATA[") {
            let end = cdata
                .find("]]>")
                .map_or(rest.len(), |e| "<![CDATA[".len() + e + 3);
            out.push_str(&rest[..end]);
            rest = &rest[end..];
            continue;
        }
        // Names are short: look for the `;` in the next 33 bytes only (a page of `&`s
        // without one must not cost a scan to its end each).
        let name = rest.as_bytes()[1..]
            .iter()
            .take(33)
            .position(|&b| b == b';')
            .map(|n| &rest[1..=n + 1])
            .filter(|name| {
                name.len() > 1
                    && name[..name.len() - 1]
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric())
            });
        match name.filter(|n| !matches!(*n, "lt;" | "gt;" | "amp;" | "apos;" | "quot;")) {
            Some(name) if rest.starts_with('&') && NAMED_ENTITIES.get(name).is_some() => {
                let (first, second) = NAMED_ENTITIES.get(name).copied().unwrap_or((0, 0));
                out.push_str(&format!("&#{first};"));
                if second != 0 {
                    out.push_str(&format!("&#{second};"));
                }
                rest = &rest[1 + name.len()..];
            }
            _ => {
                out.push_str(&rest[..1]);
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// A node of a parsed page, as [`visible_text`] walks it: scraper's HTML5 tree or roxmltree's
/// XML one.
trait PageNode<'a>: Copy {
    /// A text node's text (CDATA included).
    fn text(self) -> Option<&'a str>;
    /// An element's local name and whether a class of it marks page chrome.
    fn element(self) -> Option<(&'a str, bool)>;
    /// An element's, the document's or a fragment's children.
    fn children(self) -> Vec<Self>;
}

impl<'a> PageNode<'a> for NodeRef<'a, Node> {
    fn text(self) -> Option<&'a str> {
        match self.value() {
            Node::Text(text) => Some(text),
            _ => None,
        }
    }
    fn element(self) -> Option<(&'a str, bool)> {
        match self.value() {
            Node::Element(e) => Some((e.name(), e.classes().any(|c| SKIPPED_CLASSES.contains(&c)))),
            _ => None,
        }
    }
    fn children(self) -> Vec<Self> {
        match self.value() {
            Node::Element(_) | Node::Document | Node::Fragment => {
                NodeRef::children(&self).collect()
            }
            _ => Vec::new(),
        }
    }
}

impl<'a, 'input> PageNode<'a> for roxmltree::Node<'a, 'input> {
    fn text(self) -> Option<&'a str> {
        let text = self
            .is_text()
            .then(|| roxmltree::Node::text(&self))
            .flatten()?;
        // HTML's parser drops a newline right after `<pre>` (and `<textarea>`, `<listing>`);
        // XML keeps it: dropped here too, so that a page reads the same either way.
        let first_in_pre = self.prev_sibling().is_none()
            && self
                .parent()
                .is_some_and(|p| matches!(p.tag_name().name(), "pre" | "textarea" | "listing"));
        Some(match first_in_pre {
            true => text.strip_prefix('\n').unwrap_or(text),
            false => text,
        })
    }
    fn element(self) -> Option<(&'a str, bool)> {
        self.is_element().then(|| {
            let chrome = self
                .attribute("class")
                .is_some_and(|c| c.split_whitespace().any(|c| SKIPPED_CLASSES.contains(&c)));
            (self.tag_name().name(), chrome)
        })
    }
    fn children(self) -> Vec<Self> {
        roxmltree::Node::children(&self).collect()
    }
}

/// The visible text under `root`: chrome skipped, blocks on lines of their own, `<pre>` as
/// laid out, whitespace elsewhere collapsed; paragraphs separated by blank lines.
fn visible_text<'a, N: PageNode<'a>>(root: N, capacity: usize) -> String {
    let mut out = String::with_capacity(capacity);
    // Explicit stack instead of recursion: a hostile page can nest elements arbitrarily deep.
    enum Visit<N> {
        Enter(N),
        Leave { block: bool, pre: bool },
    }
    let mut stack = vec![Visit::Enter(root)];
    let mut pre_depth = 0usize;
    while let Some(visit) = stack.pop() {
        match visit {
            Visit::Enter(node) => {
                if let Some(text) = node.text() {
                    if pre_depth > 0 {
                        out.push_str(text);
                    } else {
                        push_collapsed(&mut out, text);
                    }
                    continue;
                }
                let (block, pre) = match node.element() {
                    Some((name, chrome)) => {
                        if chrome || SKIPPED.contains(&name) {
                            continue;
                        }
                        let block = BLOCKS.contains(&name);
                        if block {
                            break_line(&mut out);
                        } else if CELLS.contains(&name)
                            && !out.is_empty()
                            && !out.ends_with(char::is_whitespace)
                        {
                            out.push('\t');
                        }
                        (block, name == "pre")
                    }
                    None => (false, false),
                };
                if pre {
                    pre_depth += 1;
                }
                stack.push(Visit::Leave { block, pre });
                // Children go on the stack in reverse so they are visited in order.
                stack.extend(node.children().into_iter().rev().map(Visit::Enter));
            }
            Visit::Leave { block, pre } => {
                if pre {
                    pre_depth -= 1;
                }
                if block {
                    break_line(&mut out);
                }
            }
        }
    }
    tidy(&out)
}

/// Appends `text` with runs of whitespace shown as one space.
fn push_collapsed(out: &mut String, text: &str) {
    let mut pending_space = text.starts_with(char::is_whitespace);
    for word in text.split_whitespace() {
        if pending_space && !out.is_empty() && !out.ends_with(char::is_whitespace) {
            out.push(' ');
        }
        out.push_str(word);
        pending_space = true;
    }
    if text.ends_with(char::is_whitespace) && !text.trim().is_empty() {
        out.push(' ');
    }
}

fn break_line(out: &mut String) {
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
}

/// Trims trailing spaces on each line and keeps at most one blank line between paragraphs.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank_run > 0 { "\n\n" } else { "\n" });
        }
        blank_run = 0;
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_as_the_tree_builder_would_close_elements() {
        let depth = |html: &str| nesting_depth(html, MAX_NESTING);
        assert_eq!(depth("<div><section><b>x</b></section></div>"), 3);
        // optional end tags, void elements, end tags of what is not open: no nesting
        let sloppy = "<ul>".to_owned() + &"<li><p>item<br><img src=x></span>".repeat(10_000);
        assert_eq!(depth(&sloppy), 1);
        // an end tag closes what was left open inside it
        let unclosed = "<div><b><i>text</div>".repeat(10_000);
        assert_eq!(depth(&unclosed), 3);
        // markup inside a script or a style is text
        let script = format!(
            "<script>{}</script><style>{}</style>",
            "<div>".repeat(9_000),
            "<div>".repeat(9_000)
        );
        assert_eq!(depth(&script), 1);
        // `/>` does not close an HTML element (it does in SVG)
        assert!(depth(&"<div/>".repeat(10_000)) > MAX_NESTING);
        assert_eq!(
            depth(&format!("<svg>{}</svg>", "<path/>".repeat(10_000))),
            1
        );
        // a hostile page stops being read at the limit, at once
        let started = std::time::Instant::now();
        let deep = "<div>".repeat(200_000);
        assert!(depth(&deep) > MAX_NESTING);
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    use super::extract_text;

    #[test]
    fn skips_chrome_and_keeps_structure() {
        let html = r#"<html><head><title>T</title><style>p{}</style></head><body>
            <div class="navheader"><a href="x">Prev</a> Up</div>
            <h1>Indexes</h1><p>An index   is a
            <b>data</b> structure.</p><script>alert(1)</script>
            <pre class="programlisting">CREATE INDEX i
    ON t (c);</pre><div class="navfooter">Next</div></body></html>"#;
        let text = extract_text(html);
        assert_eq!(
            text,
            "Indexes\nAn index is a data structure.\nCREATE INDEX i\n    ON t (c);"
        );
    }

    #[test]
    fn table_cells_stay_apart() {
        let html = "<table><tr><td>reserved</td><td>non-reserved</td></tr><tr><th>a</th><th>b</th></tr></table>";
        assert_eq!(extract_text(html), "reserved\tnon-reserved\na\tb");
    }

    /// XHTML read as XML: self-closing raw-text elements close, CDATA is text, HTML's named
    /// references read as HTML reads them (CDATA keeps its `&name;` as written), chrome and
    /// blocks as in HTML. Read as HTML5, the first chapter below lost every word after
    /// `<title/>`, the second everything after `<iframe/>` (an audit).
    #[test]
    fn xhtml_is_read_as_xml() {
        let page = |body: &str| {
            format!(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<!DOCTYPE html PUBLIC \
                 \"-//W3C//DTD XHTML 1.1//EN\" \"http://www.w3.org/TR/xhtml11/DTD/xhtml11.dtd\">\n\
                 <html xmlns=\"http://www.w3.org/1999/xhtml\"><head><title/><script \
                 src=\"x.js\"/></head><body>{body}</body></html>"
            )
        };
        let one =
            page("<h1>Chapter One</h1><p>It was a bright&nbsp;cold day &mdash; in April.</p>");
        assert!(is_xhtml(std::path::Path::new("ch1.html"), &one));
        assert_eq!(
            extract_xhtml_text(&one).as_deref(),
            Some("Chapter One\nIt was a bright cold day \u{2014} in April.")
        );
        let two = page(
            "<p>Before the embed.</p><iframe src=\"a.html\"/><textarea/><p>After: \
             <![CDATA[a < b && b > c &nbsp;]]> in code.</p><div class=\"navfooter\">Next</div>",
        );
        assert_eq!(
            extract_xhtml_text(&two).as_deref(),
            Some("Before the embed.\nAfter: a < b && b > c &nbsp; in code.")
        );
        // Not well-formed: the caller reads it as HTML.
        assert_eq!(extract_xhtml_text("<p>unclosed <b>bold</p>"), None);
        // Entities declared in the page are never expanded: the page goes to the HTML reader.
        let bomb = format!(
            "<?xml version=\"1.0\"?><!DOCTYPE html [<!ENTITY b \"{}\">]><html \
             xmlns=\"http://www.w3.org/1999/xhtml\"><body><p>{}</p></body></html>",
            "x".repeat(1000),
            "&b;".repeat(1000)
        );
        assert_eq!(extract_xhtml_text(&bomb), None);
        assert!(is_xhtml(std::path::Path::new("c.XHTML"), "<p>x</p>"));
        assert!(!is_xhtml(
            std::path::Path::new("c.html"),
            "<html><p>x</p></html>"
        ));
        // `&` without a name, unknown names and XML's own five pass through to the parser.
        assert_eq!(
            html_entities_as_numbers("a & b &unknown; &lt; &copy;&nbsp"),
            "a & b &unknown; &lt; &#169;&nbsp"
        );
    }

    /// Well-formed XHTML without the constructs HTML5 reads otherwise reads the same through
    /// either reader: the quickstart's 78 PostgreSQL manual pages (XHTML 1.0), byte for byte
    /// (HTML's dropped newline after `<pre>` included).
    #[test]
    fn the_xml_reader_reads_ordinary_xhtml_as_the_html_reader_does() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/quickstart/corpus/postgres");
        let mut pages = 0;
        for entry in std::fs::read_dir(&dir).expect("the quickstart corpus") {
            let path = entry.expect("entry").path();
            if path.extension().is_none_or(|e| e != "html") {
                continue;
            }
            let page = std::fs::read_to_string(&path).expect("utf-8 page");
            assert!(is_xhtml(&path, &page), "{}", path.display());
            assert_eq!(
                extract_xhtml_text(&page).as_deref(),
                Some(extract_text(&page).as_str()),
                "{}",
                path.display()
            );
            pages += 1;
        }
        assert_eq!(pages, 78);
    }

    #[test]
    fn survives_deep_nesting_and_garbage() {
        let deep = "<div>".repeat(20_000) + "x";
        assert_eq!(extract_text(&deep), "x");
        assert_eq!(extract_text("<<<>>> &amp; <p"), "<<<>>> &");
    }
}
