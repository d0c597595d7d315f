// Model text → safe DOM. markdown-it (vendor/markdown-it.min.js) parses the Markdown with raw HTML off, so
// markup in a reply stays visible text; DOMPurify (vendor/purify.min.js) then keeps only an allow-list of
// tags and attributes; links survive only for http(s) and mailto, and open in a new tab.
//
// render() is total: for any input it returns a DocumentFragment (the Markdown, or the plain text when
// anything at all goes wrong) and never throws, so no reply can break the page. Text nested deeper than
// markdown-it's maxNesting, which markdown-it would drop with all that follows, is shown as plain text.
"use strict";

const LlamarelayMarkdown = (() => {
  const SAFE_URL = /^(?:https?:|mailto:)/i;
  const LINK_REL = "noopener noreferrer nofollow";
  // Everything markdown-it emits with html:false and images off; anything else is dropped.
  const SANITIZE = {
    ALLOWED_TAGS: ["p", "br", "strong", "em", "s", "code", "pre", "a", "ul", "ol", "li", "blockquote", "hr",
                   "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td"],
    ALLOWED_ATTR: ["href", "class", "start"],
    ALLOWED_URI_REGEXP: /^(?:https?|mailto):/i,
    RETURN_DOM_FRAGMENT: true,
  };
  let md = null;  // built on first use, so a missing library becomes plain text instead of a broken page

  function parser() {
    const parser = window.markdownit({ html: false, linkify: true, breaks: true, typographer: false });
    // The CSP loads no foreign images, and fetching one would tell its host that the reply was read.
    parser.disable("image");
    parser.validateLink = (url) => SAFE_URL.test(url.trim());
    parser.core.ruler.push("llamarelay_page", (state) => {
      for (const token of state.tokens) {
        if (token.type === "heading_open" || token.type === "heading_close") {
          // A "# Title" in a chat bubble should not outshout the page: h1 → h3 … h4+ → h6.
          token.tag = `h${Math.min(6, Number(token.tag.slice(1)) + 2)}`;
        } else if ((token.type === "th_open" || token.type === "td_open") && token.attrGet("style")) {
          // Inline styles break the CSP (style-src 'self'): table alignment becomes a class.
          const align = /text-align:(left|center|right)/.exec(token.attrGet("style"));
          token.attrs = token.attrs.filter(([name]) => name !== "style");
          if (align) token.attrJoin("class", `align-${align[1]}`);
        }
      }
    });
    // markdown-it drops a block nested past maxNesting, and everything after it up to the end of its parent
    // (usually the reply's end). Note the first line dropped, so that render() shows it and the rest as text.
    const tokenize = parser.block.tokenize;
    parser.block.tokenize = function (state, startLine, endLine) {
      if (state.level >= parser.options.maxNesting) {
        const line = state.skipEmptyLines(startLine);  // the line markdown-it's own loop stops at
        if (line < endLine && state.sCount[line] >= state.blkIndent) state.env.droppedLine ??= line;
      }
      return tokenize.call(this, state, startLine, endLine);
    };
    return parser;
  }

  function plain(text) {
    const p = document.createElement("p");
    p.className = "plain";
    try {
      p.textContent = String(text);
    } catch {
      p.textContent = "";
    }
    return p;
  }

  /** ``text`` as HTML up to the first line markdown-it would drop, and from that line on as ``rest`` (mostly ""). */
  function markdownOf(text) {
    let lines = text.split(/\r\n?|\n/);  // markdown-it's own lines: it turns \r\n and \r into \n
    let rest = [];
    for (;;) {
      const env = {};
      const html = md.render(lines.join("\n"), env);
      if (env.droppedLine === undefined) return { html, rest: rest.join("\n") };
      rest = [...lines.slice(env.droppedLine), ...rest];  // the part kept may, parsed alone, drop a line too
      lines = lines.slice(0, env.droppedLine);
    }
  }

  /** Renders ``text`` into a DocumentFragment. An unclosed code fence (a reply still streaming) runs to the end. */
  function render(text) {
    const out = document.createDocumentFragment();
    try {
      md ??= parser();
      const { html, rest } = markdownOf(String(text));
      const clean = DOMPurify.sanitize(html, SANITIZE);
      if (!(clean instanceof DocumentFragment)) throw new Error("DOMPurify cannot sanitize in this browser");
      for (const a of clean.querySelectorAll("a")) {
        if (SAFE_URL.test(a.getAttribute("href") ?? "")) {
          a.target = "_blank";
          a.rel = LINK_REL;
        } else {
          a.replaceWith(...a.childNodes);  // an unsafe target keeps its words, loses the link
        }
      }
      out.append(clean);
      if (rest) out.append(plain(rest));
    } catch (error) {
      console.warn("llamarelay: Markdown failed, the reply is shown as plain text:", error);
      out.replaceChildren(plain(text));
    }
    return out;
  }

  return { render };
})();
