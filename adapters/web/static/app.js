// llamarelay's chat page: talks to the JSON API under /api/ and reads replies as Server-Sent Events.
// User text is shown with textContent; model text goes through LlamarelayMarkdown (DOM nodes, no HTML).
// Regenerate and Continue act on the conversation's latest answer, and show only when they apply to it.
"use strict";

(() => {
  const POLL_MS = 1000;  // while a reply of an opened conversation is still being written elsewhere
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
    regenerate: $("regenerate"), continue: $("continue"), attach: $("attach"), files: $("files"),
    attachments: $("attachments"),
    reset: $("reset"), queue: $("queue"), list: $("conversations"), newChat: $("new-chat"), model: $("model"),
    banner: $("banner"), system: $("system-prompt"), systemSave: $("system-save"),
    systemDefault: $("system-default"), systemSaved: $("system-saved"), composer: $("composer"),
    tokenDialog: $("token-dialog"), tokenForm: $("token-form"), token: $("token"), tokenError: $("token-error"),
  };
  const STATUS_NOTES = {
    stopped: "⏹️ Stopped.", failed: "⚠️ This reply failed.", interrupted: "⚠️ This reply was cut short.",
  };

  let current = null;        // id of the open conversation
  let streaming = null;      // {conversation, bubble} while this page streams a reply
  let latest = null;         // {id, canContinue}: the open conversation's latest answer, once it is finished
  let attached = [];         // Files to send with the next message
  let limits = { maxFiles: 10, maxFileBytes: 200000, maxImages: 4, maxImageBytes: 10000000 };
  let pollTimer = null;

  // -- API ---------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(`/api/${path}`, options);
    if (!response.ok) throw await errorOf(response);
    return response.headers.get("Content-Type")?.startsWith("application/json") ? response.json() : response;
  }

  async function errorOf(response) {
    try {
      const body = await response.json();
      return new ApiError(response.status, body.error, body.message || body.error);
    } catch {
      return new ApiError(response.status, "http_error", `The server answered ${response.status}.`);
    }
  }

  async function authorize() {
    ui.tokenError.hidden = true;
    ui.tokenDialog.showModal();
    return new Promise((resolve) => {
      ui.tokenForm.onsubmit = async (event) => {
        event.preventDefault();
        try {
          await api("POST", "login", { token: ui.token.value });
          ui.token.value = "";
          ui.tokenDialog.close();
          resolve();
        } catch (error) {
          ui.tokenError.textContent = error.message;
          ui.tokenError.hidden = false;
        }
      };
    });
  }

  function showError(error) {
    ui.banner.textContent = error instanceof Error ? error.message : String(error);
    ui.banner.hidden = false;
  }

  function clearError() {
    ui.banner.hidden = true;
  }

  // -- messages ----------------------------------------------------------------------------------------

  function bubble(role) {
    const node = document.createElement("article");
    node.className = `message ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const status = document.createElement("div");
    status.className = "status";
    const body = document.createElement("div");
    body.className = "body";
    const notes = document.createElement("div");
    notes.className = "notes";
    node.append(who, status, body, notes);
    ui.empty.hidden = true;
    ui.messages.append(node);
    return node;
  }

  function setText(node, text) {
    const body = node.querySelector(".body");
    body.textContent = text;
    if (node.classList.contains("assistant")) {
      try {
        body.replaceChildren(LlamarelayMarkdown.render(text));
      } catch (error) {  // render() never throws; should it be missing, the plain text above stays
        console.warn("llamarelay: the reply is shown as plain text:", error);
      }
    }
    node.dataset.text = text;
  }

  function setState(node, status, notes = []) {
    node.dataset.status = status;
    node.querySelector(".status").textContent = "";
    const lines = notes.length ? notes : (STATUS_NOTES[status] ? [STATUS_NOTES[status]] : []);
    node.querySelector(".notes").replaceChildren(...lines.map((line) => {
      const p = document.createElement("p");
      p.textContent = line;
      return p;
    }));
  }

  /** Run / Deny under a reply whose tool call waits for approval (``approval`` null: it no longer waits). */
  function showApproval(reply, conversation, approval) {
    reply.querySelector(".approval")?.remove();
    if (!approval) return;
    const box = document.createElement("div");
    box.className = "approval";
    for (const [label, run] of [["▶️ Run", true], ["🚫 Deny", false]]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.addEventListener("click", guarded(async () => {
        box.querySelectorAll("button").forEach((b) => { b.disabled = true; });
        const path = `conversations/${encodeURIComponent(conversation)}/approvals/${encodeURIComponent(approval)}`;
        await api("POST", path, { run });
      }));
      box.append(button);
    }
    reply.querySelector(".notes").before(box);
  }

  /** A closed disclosure under a reply that called tools: opening it fetches their arguments and results,
   *  shown as plain text (a tool's output is untrusted: never markup). */
  function showToolDetails(reply, conversation, replyId) {
    reply.querySelector(".tools")?.remove();
    const details = document.createElement("details");
    details.className = "tools";
    const summary = document.createElement("summary");
    summary.textContent = "🔧 Tool details";
    details.append(summary);
    details.addEventListener("toggle", () => {
      if (!details.open || details.dataset.loaded) return;
      details.dataset.loaded = "true";
      const path = `conversations/${encodeURIComponent(conversation)}/replies/${replyId}/tools`;
      api("GET", path).then(({ calls }) => {
        details.append(...calls.map((call) => {
          const pre = document.createElement("pre");
          pre.textContent = `${call.tool} (round ${call.round})${call.is_error ? " — failed" : ""}\n` +
            `arguments: ${call.arguments}\nresult: ${call.result}`;
          return pre;
        }));
      }).catch((error) => {
        delete details.dataset.loaded;
        showError(error);
      });
    });
    reply.append(details);
  }

  function nearBottom() {
    const el = document.scrollingElement;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  }

  function scrollDown(force = false) {
    if (force || nearBottom()) window.scrollTo(0, document.scrollingElement.scrollHeight);
  }

  /** A stored message as its bubble shows it: its text, then a line for each image sent with it. */
  function shown(message) {
    return [message.content, ...(message.images || []).map((name) => `🖼️ ${name}`)].filter(Boolean).join("\n\n");
  }

  function renderHistory(conversation) {
    ui.messages.querySelectorAll(".message").forEach((node) => node.remove());
    ui.empty.hidden = conversation.messages.length > 0;
    latest = null;
    for (const message of conversation.messages) {
      const node = bubble(message.role);
      setText(node, shown(message));
      if (message.role === "assistant") {
        node.dataset.id = message.id;
        setState(node, message.status, message.notes);
        if (message.tool_details) showToolDetails(node, conversation.id, message.id);
        if (message.status === "generating") node.querySelector(".status").textContent = "✍️ Writing…";
        else if (message.id === conversation.latest_reply) {
          latest = { id: message.id, canContinue: message.can_continue };
        }
      }
    }
    scrollDown(true);
  }

  /** Regenerate and Continue show beside Stop only while they apply: to a finished latest answer. */
  function showActions() {
    ui.regenerate.hidden = Boolean(streaming) || !latest;
    ui.continue.hidden = Boolean(streaming) || !latest?.canContinue;
  }

  function latestFrom(done) {
    return done && done.reply_id !== null ? { id: done.reply_id, canContinue: done.can_continue } : null;
  }

  // -- conversations -----------------------------------------------------------------------------------

  async function loadList() {
    const { conversations } = await api("GET", "conversations");
    ui.list.replaceChildren(...conversations.map((c) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `#${c.id}`;
      a.textContent = c.title;
      a.dataset.id = c.id;
      if (c.id === current) a.setAttribute("aria-current", "page");
      li.append(a);
      return li;
    }));
    return conversations;
  }

  async function open(id) {
    clearTimeout(pollTimer);
    current = id;
    if (location.hash !== `#${id}`) history.replaceState(null, "", `#${id}`);
    const conversation = await api("GET", `conversations/${encodeURIComponent(id)}`);
    if (current !== id) return;
    ui.system.value = conversation.system_prompt;
    ui.systemSaved.textContent = "";
    ui.model.value = conversation.model;
    if (streaming && streaming.conversation === id) {
      // This page is streaming into it: keep the live bubbles rather than the stored snapshot.
      return;
    }
    renderHistory(conversation);
    const last = conversation.messages.at(-1);
    const generating = last && last.status === "generating";
    setBusy(generating);
    if (generating) pollTimer = setTimeout(() => open(id).catch(showError), POLL_MS);
    await loadList();
  }

  async function newConversation() {
    if (current && !streaming && !ui.messages.querySelector(".message")) {
      ui.input.focus();  // the open conversation is still empty: no need for another
      return current;
    }
    const created = await api("POST", "conversations");
    await open(created.id);
    return created.id;
  }

  function setBusy(busy) {
    ui.stop.disabled = !busy;
    ui.send.disabled = busy;
    if (!busy) ui.queue.textContent = "";
    showActions();
  }

  // -- files -------------------------------------------------------------------------------------------

  function attach(files) {
    const room = limits.maxFiles - attached.length;
    if (files.length > room) showError(`At most ${limits.maxFiles} files go with one message.`);
    attached.push(...[...files].slice(0, Math.max(0, room)));
    showAttachments();
  }

  function showAttachments() {
    ui.attachments.replaceChildren(...attached.map((file, index) => {
      const li = document.createElement("li");
      li.textContent = `📎 ${file.name}`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "secondary";
      remove.textContent = "×";
      remove.setAttribute("aria-label", `Remove ${file.name}`);
      remove.addEventListener("click", () => {
        attached.splice(index, 1);
        showAttachments();
      });
      li.append(remove);
      return li;
    }));
  }

  /** An image the model may read (the server judges the same way, by type or name). */
  function isImage(file) {
    return file.type !== "image/svg+xml"
      && (file.type.startsWith("image/") || /\.(png|jpe?g|webp|gif|bmp|tiff?)$/i.test(file.name));
  }

  /** The message as a form: its text and each file, cut just past the size limit (the server skips it
   *  then, with a line saying so, and the rest never travels). Images past the count go empty: the server
   *  names them as skipped without reading them. */
  function form(text, files) {
    const body = new FormData();
    body.append("text", text);
    let images = 0;
    for (const file of files) {
      const keep = !isImage(file) ? limits.maxFileBytes + 1
        : images++ < limits.maxImages ? limits.maxImageBytes + 1 : 0;
      body.append("file", file.slice(0, keep, file.type), file.name);
    }
    return body;
  }

  // -- sending and streaming ---------------------------------------------------------------------------

  async function send() {
    const text = ui.input.value;
    const files = attached;
    if ((!text.trim() && !files.length) || streaming) return;
    clearError();
    const id = current || await newConversation();
    ui.input.value = "";
    const user = bubble("user");
    const pictures = files.filter(isImage).map((file) => `🖼️ ${file.name}`);
    setText(user, [text, ...files.filter((file) => !isImage(file)).map((file) => `📎 ${file.name}`), ...pictures]
      .filter(Boolean).join("\n\n"));
    const reply = bubble("assistant");
    const body = files.length ? { body: form(text, files) }
      : { headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text }) };
    const done = await streamInto(id, "messages", body, reply, () => {
      // Refused (or the server is unreachable): nothing was stored, so the text goes back to the input.
      user.remove();
      reply.remove();
      ui.input.value = text;
    }, () => {
      attached = [];
      showAttachments();
    });
    if (done?.reply_id && files.length) {
      // Show the message as it was stored: with the files' text, as the model read it, and its images.
      const { messages } = await api("GET", `conversations/${encodeURIComponent(id)}`);
      const at = messages.findIndex((m) => m.id === done.reply_id);
      if (at > 0 && messages[at - 1].role === "user") setText(user, shown(messages[at - 1]));
    }
    await loadList().catch(showError);
  }

  /** Regenerate (a new answer in place of the latest) or Continue (the latest answer, grown). */
  async function redo(action) {
    if (!current || !latest || streaming) return;
    clearError();
    const id = current;
    const reply = ui.messages.querySelector(`.message.assistant[data-id="${latest.id}"]`);
    if (!reply) return;
    const body = { headers: { "Content-Type": "application/json" }, body: JSON.stringify({ reply_id: latest.id }) };
    const done = await streamInto(id, action, body, reply, () => open(id));
    if (done && done.reply_id === null) {
      // The answer changed before our turn came: show the conversation as it is now, and why.
      await open(id).catch(showError);
      showError(done.notes.join(" "));
    }
  }

  /** POSTs to a streaming endpoint and shows the reply in ``reply``; the ``done`` event, or null. */
  async function streamInto(id, path, options, reply, refused, accepted = () => {}) {
    streaming = { conversation: id, bubble: reply };
    setBusy(true);
    const before = { text: reply.dataset.text ?? "", status: reply.dataset.status };
    reply.dataset.status = "generating";
    reply.querySelector(".notes").replaceChildren();
    if (path !== "continue") setText(reply, "");
    scrollDown(true);
    let response;
    try {
      response = await fetch(`/api/conversations/${encodeURIComponent(id)}/${path}`,
                             { method: "POST", credentials: "same-origin", ...options });
      if (!response.ok) throw await errorOf(response);
    } catch (error) {
      streaming = null;
      setText(reply, before.text);
      reply.dataset.status = before.status;
      setBusy(false);
      await refused();
      throw error;
    }
    accepted();
    // From here on the request is the server's: whatever happens, the bubbles stay and the server's copy wins.
    let done = null;
    try {
      done = await readStream(response, reply, id);
    } catch (error) {
      showError(error);
    } finally {
      streaming = null;
      if (current === id) latest = latestFrom(done);  // another conversation opened meanwhile has its own
      if (done?.reply_id) reply.dataset.id = done.reply_id;
      setBusy(false);
    }
    if (done === null) {
      // The stream broke before its end: the server still finishes and stores the reply.
      await open(id).catch(showError);
    }
    return done;
  }

  /** Applies the reply's events to its bubble; returns the ``done`` event, or null if the stream broke. */
  async function readStream(response, reply, conversation) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let text = "";
    let frame = 0;
    const paint = () => {
      frame = 0;
      setText(reply, text);
      scrollDown();
    };
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch {
        return null;
      }
      if (chunk.done) return null;
      buffer += chunk.value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseFrame(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!event) continue;
        const { name, data } = event;
        if (name === "status") {
          // The message is stored by now: the list can show its title.
          if (!reply.dataset.listed) loadList().catch(showError);
          reply.dataset.listed = "true";
          reply.querySelector(".status").textContent = data.text;
          ui.queue.textContent = data.kind === "queued" ? `Queued: #${data.position} in line` : "";
        } else if (name === "approval") {
          showApproval(reply, conversation, data.id);
          scrollDown();
        } else if (name === "delta" || name === "replace") {
          reply.querySelector(".status").textContent = "";
          ui.queue.textContent = "";
          text = name === "delta" ? text + data.text : data.text;
          if (!frame) frame = requestAnimationFrame(paint);
        } else if (name === "done") {
          if (frame) cancelAnimationFrame(frame);
          setText(reply, data.text);
          setState(reply, data.status, data.notes);
          showApproval(reply, conversation, null);
          if (data.tool_details && data.reply_id) showToolDetails(reply, conversation, data.reply_id);
          scrollDown();
          return data;
        }
      }
    }
  }

  function parseFrame(frame) {
    let name = "message";
    let data = "";
    for (const line of frame.split("\n")) {
      if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data += line.slice(5).trim();
    }
    return data ? { name, data: JSON.parse(data) } : null;
  }

  // -- wiring ------------------------------------------------------------------------------------------

  function guarded(action) {
    return (event) => {
      event?.preventDefault();
      clearError();
      Promise.resolve().then(action).catch(async (error) => {
        if (error.code === "token_required") {
          await authorize();
          return action();
        }
        if (error.code === "unknown_conversation") {
          current = null;
          await loadList();
        }
        throw error;
      }).catch(showError);
    };
  }

  ui.composer.addEventListener("submit", guarded(send));
  ui.input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.composer.requestSubmit();
    }
  });
  ui.stop.addEventListener("click", guarded(async () => {
    if (current) await api("POST", `conversations/${encodeURIComponent(current)}/stop`);
  }));
  ui.regenerate.addEventListener("click", guarded(() => redo("regenerate")));
  ui.continue.addEventListener("click", guarded(() => redo("continue")));
  ui.attach.addEventListener("click", () => ui.files.click());
  ui.files.addEventListener("change", () => {
    attach(ui.files.files);
    ui.files.value = "";  // choosing the same file again is a change too
  });
  ui.input.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (!files.length) return;  // text pastes as text
    event.preventDefault();
    attach(files);
  });
  ui.composer.addEventListener("dragover", (event) => event.preventDefault());
  ui.composer.addEventListener("drop", (event) => {
    event.preventDefault();
    attach(event.dataTransfer.files);
  });
  ui.newChat.addEventListener("click", guarded(newConversation));
  ui.reset.addEventListener("click", guarded(async () => {
    if (!current) return;
    await api("POST", `conversations/${encodeURIComponent(current)}/reset`);
    await open(current);
  }));
  ui.systemSave.addEventListener("click", guarded(async () => {
    const prompt = ui.system.value;  // read first: opening a new conversation shows its (default) prompt
    const id = current || await newConversation();
    const saved = await api("PUT", `conversations/${encodeURIComponent(id)}/system_prompt`,
                            { system_prompt: prompt });
    ui.system.value = saved.system_prompt;
    ui.systemSaved.textContent = "Saved.";
  }));
  ui.systemDefault.addEventListener("click", guarded(async () => {
    if (!current) return;
    const saved = await api("PUT", `conversations/${encodeURIComponent(current)}/system_prompt`,
                            { system_prompt: null });
    ui.system.value = saved.system_prompt;
    ui.systemSaved.textContent = "Back to the default.";
  }));
  ui.model.addEventListener("change", guarded(async () => {
    const name = ui.model.value;  // read first: opening a new conversation shows its (default) model
    const id = current || await newConversation();
    const saved = await api("PUT", `conversations/${encodeURIComponent(id)}/model`, { model: name });
    ui.model.value = saved.model;
  }));
  ui.list.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-id]");
    if (!link) return;
    guarded(() => open(link.dataset.id))(event);
  });
  window.addEventListener("hashchange", () => {
    const id = location.hash.slice(1);
    if (id && id !== current) guarded(() => open(id))();
  });

  // The configured models, for the picker: its value is the open conversation's model (the default until one
  // is opened); a model other than the default says so under each of its answers.
  function showModels(models) {
    ui.model.replaceChildren(...models.map((model) => {
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name + (model.description ? ` — ${model.description}` : "");
      option.title = model.vision ? "reads images" : "";
      return option;
    }));
    ui.model.value = models.find((model) => model.default).name;
    ui.model.disabled = models.length < 2;
  }

  async function start() {
    let info;
    try {
      info = await api("GET", "info");
    } catch (error) {
      if (error.code !== "token_required") throw error;
      await authorize();
      info = await api("GET", "info");
    }
    showModels(info.models);
    ui.input.maxLength = info.max_message_chars;
    ui.system.maxLength = info.max_system_prompt_chars;
    ui.system.value = info.default_system_prompt;
    limits = { maxFiles: info.max_files, maxFileBytes: info.max_file_bytes, maxImages: info.max_images,
      maxImageBytes: info.max_image_bytes };
    const conversations = await loadList();
    const wanted = location.hash.slice(1);
    const id = conversations.some((c) => c.id === wanted) ? wanted : conversations[0]?.id;
    if (id) await open(id);
    ui.input.focus();
  }

  // "ready" once loading ended, well or not: a failure shows in the banner, never as a page that hangs.
  start().catch(showError).finally(() => { document.body.dataset.ready = "true"; });
})();
