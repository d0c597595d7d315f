// A small, safe Markdown renderer: code blocks, inline code, lists, headings, quotes, bold, italics, links.
//
// Safety comes from never parsing HTML: the text is cut into blocks and inline pieces, and every piece
// becomes a DOM node built with createElement / text nodes. Anything that looks like markup
// (<img src=x onerror=...>, <script>) therefore stays visible text. Links are kept only for http(s) URLs.
"use strict";

const LlamarelayMarkdown = (() => {
  const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
  const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
  const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE = /^ {0,3}>\s?(.*)$/;
  const BULLET = /^(\s*)[-*+]\s+(.*)$/;
  const ORDERED = /^(\s*)(\d{1,9})[.)]\s+(.*)$/;

  const INLINE = new RegExp([
    "(?<tick>`+)(?<code>[^`]|[^`][\\s\\S]*?[^`])\\k<tick>(?!`)",
    "\\*\\*(?<strong>\\S(?:[\\s\\S]*?\\S)?)\\*\\*",
    "(?<![\\p{L}\\p{N}_])__(?<strong2>\\S(?:[\\s\\S]*?\\S)?)__(?![\\p{L}\\p{N}_])",
    "~~(?<del>\\S(?:[\\s\\S]*?\\S)?)~~",
    "\\*(?<em>[^\\s*](?:[\\s\\S]*?[^\\s*])?)\\*",
    "(?<![\\p{L}\\p{N}_])_(?<em2>[^\\s_](?:[\\s\\S]*?[^\\s_])?)_(?![\\p{L}\\p{N}_])",
    "\\[(?<label>[^\\]\\n]+)\\]\\(\\s*<?(?<href>[^\\s()<>]+)>?\\s*\\)",
    "(?<bare>https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])",
  ].join("|"), "gu");

  /** The URL as an absolute http(s) address, or null for anything else (javascript:, data:, relative…). */
  function safeUrl(raw) {
    try {
      const url = new URL(raw);
      return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
    } catch {
      return null;
    }
  }

  function element(tag, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function link(href, labelText) {
    const a = element("a");
    a.href = href;
    a.rel = "noopener noreferrer nofollow";
    a.target = "_blank";
    inline(labelText, a);
    return a;
  }

  /** Appends ``text`` to ``parent`` with inline formatting; plain runs become text nodes. */
  function inline(text, parent) {
    let last = 0;
    for (const match of text.matchAll(INLINE)) {
      if (match.index > last) parent.append(text.slice(last, match.index));
      const g = match.groups;
      if (g.tick !== undefined) {
        const code = element("code");
        code.textContent = g.code.replace(/^ (.*) $/s, "$1");
        parent.append(code);
      } else if (g.strong !== undefined || g.strong2 !== undefined) {
        const strong = element("strong");
        inline(g.strong ?? g.strong2, strong);
        parent.append(strong);
      } else if (g.del !== undefined) {
        const del = element("del");
        inline(g.del, del);
        parent.append(del);
      } else if (g.em !== undefined || g.em2 !== undefined) {
        const em = element("em");
        inline(g.em ?? g.em2, em);
        parent.append(em);
      } else if (g.label !== undefined) {
        const href = safeUrl(g.href);
        if (href) parent.append(link(href, g.label));
        else inline(g.label, parent);  // an unsafe target keeps its words, loses the link
      } else {
        const href = safeUrl(g.bare);
        parent.append(href ? link(href, g.bare) : g.bare);
      }
      last = match.index + match[0].length;
    }
    if (last < text.length) parent.append(text.slice(last));
  }

  function paragraph(lines) {
    const p = element("p");
    lines.forEach((line, i) => {
      if (i) p.append(element("br"));
      inline(line.trim(), p);
    });
    return p;
  }

  /** Renders ``text`` into a DocumentFragment. An unclosed code fence (a reply still streaming) runs to the end. */
  function render(text) {
    const out = document.createDocumentFragment();
    const lines = String(text).replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        const fence = m[1];
        const body = [];
        i++;
        while (i < lines.length && !(lines[i].trim().startsWith(fence[0].repeat(fence.length))
                                     && /^ {0,3}[`~]+\s*$/.test(lines[i]))) {
          body.push(lines[i]);
          i++;
        }
        i++;  // the closing fence
        const pre = element("pre");
        const code = element("code", m[2] ? `language-${m[2]}` : "");
        code.textContent = body.join("\n");
        pre.append(code);
        out.append(pre);
      } else if (!line.trim()) {
        i++;
      } else if ((m = HEADING.exec(line))) {
        const h = element(`h${Math.min(6, m[1].length + 2)}`);
        inline(m[2], h);
        out.append(h);
        i++;
      } else if (RULE.test(line)) {
        out.append(element("hr"));
        i++;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
          quoted.push(m[1]);
          i++;
        }
        const blockquote = element("blockquote");
        blockquote.append(render(quoted.join("\n")));
        out.append(blockquote);
      } else if (BULLET.test(line) || ORDERED.test(line)) {
        const ordered = !BULLET.test(line);
        const pattern = ordered ? ORDERED : BULLET;
        const list = element(ordered ? "ol" : "ul");
        if (ordered) {
          const start = parseInt(ORDERED.exec(line)[2], 10);
          if (start !== 1) list.start = start;
        }
        let item = null;
        while (i < lines.length && lines[i].trim()) {
          if ((m = pattern.exec(lines[i]))) {
            item = element("li");
            inline(m[ordered ? 3 : 2], item);
            list.append(item);
          } else if (/^\s+\S/.test(lines[i]) && item) {  // an indented line continues the item
            item.append(element("br"));
            inline(lines[i].trim(), item);
          } else {
            break;
          }
          i++;
        }
        out.append(list);
      } else {
        const text = [];
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i])
               && !QUOTE.test(lines[i]) && !(text.length && (BULLET.test(lines[i]) || ORDERED.test(lines[i])))) {
          text.push(lines[i]);
          i++;
        }
        out.append(paragraph(text));
      }
    }
    return out;
  }

  return { render, safeUrl };
})();
