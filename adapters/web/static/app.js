// llamarelay's chat page: talks to the JSON API under /api/ and reads replies as Server-Sent Events.
// User text is shown with textContent; model text goes through LlamarelayMarkdown (DOM nodes, no HTML).
"use strict";

(() => {
  const POLL_MS = 1000;  // while a reply of an opened conversation is still being written elsewhere
  const $ = (id) => document.getElementById(id);
  const ui = {
    messages: $("messages"), empty: $("empty"), input: $("input"), send: $("send"), stop: $("stop"),
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

  function nearBottom() {
    const el = document.scrollingElement;
    return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
  }

  function scrollDown(force = false) {
    if (force || nearBottom()) window.scrollTo(0, document.scrollingElement.scrollHeight);
  }

  function renderHistory(messages) {
    ui.messages.querySelectorAll(".message").forEach((node) => node.remove());
    ui.empty.hidden = messages.length > 0;
    for (const message of messages) {
      const node = bubble(message.role);
      setText(node, message.content);
      if (message.role === "assistant") {
        setState(node, message.status);
        if (message.status === "generating") node.querySelector(".status").textContent = "✍️ Writing…";
      }
    }
    scrollDown(true);
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
    if (streaming && streaming.conversation === id) {
      // This page is streaming into it: keep the live bubbles rather than the stored snapshot.
      return;
    }
    renderHistory(conversation.messages);
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
  }

  // -- sending and streaming ---------------------------------------------------------------------------

  async function send() {
    const text = ui.input.value;
    if (!text.trim() || streaming) return;
    clearError();
    const id = current || await newConversation();
    ui.input.value = "";
    const user = bubble("user");
    setText(user, text);
    const reply = bubble("assistant");
    reply.dataset.status = "generating";
    setText(reply, "");
    scrollDown(true);
    streaming = { conversation: id, bubble: reply };
    setBusy(true);
    let response;
    try {
      response = await fetch(`/api/conversations/${encodeURIComponent(id)}/messages`, {
        method: "POST", headers: { "Content-Type": "application/json" }, credentials: "same-origin",
        body: JSON.stringify({ text }),
      });
      if (!response.ok) throw await errorOf(response);
    } catch (error) {
      // Refused (or the server is unreachable): nothing was stored, so the text goes back to the input.
      streaming = null;
      setBusy(false);
      user.remove();
      reply.remove();
      ui.input.value = text;
      throw error;
    }
    // From here on the message is stored: whatever happens, its bubbles stay and the server's copy wins.
    let done = null;
    try {
      done = await readStream(response, reply);
    } catch (error) {
      showError(error);
    } finally {
      streaming = null;
      setBusy(false);
    }
    if (done === null) {
      // The stream broke before its end: the server still finishes and stores the reply.
      await open(id).catch(showError);
    }
    await loadList().catch(showError);
  }

  /** Applies the reply's events to its bubble; returns the ``done`` event, or null if the stream broke. */
  async function readStream(response, reply) {
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
        } else if (name === "delta" || name === "replace") {
          reply.querySelector(".status").textContent = "";
          ui.queue.textContent = "";
          text = name === "delta" ? text + data.text : data.text;
          if (!frame) frame = requestAnimationFrame(paint);
        } else if (name === "done") {
          if (frame) cancelAnimationFrame(frame);
          setText(reply, data.text);
          setState(reply, data.status, data.notes);
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
  ui.newChat.addEventListener("click", guarded(newConversation));
  ui.reset.addEventListener("click", guarded(async () => {
    if (!current) return;
    await api("POST", `conversations/${encodeURIComponent(current)}/reset`);
    await open(current);
  }));
  ui.systemSave.addEventListener("click", guarded(async () => {
    const id = current || await newConversation();
    const saved = await api("PUT", `conversations/${encodeURIComponent(id)}/system_prompt`,
                            { system_prompt: ui.system.value });
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
  ui.list.addEventListener("click", (event) => {
    const link = event.target.closest("a[data-id]");
    if (!link) return;
    guarded(() => open(link.dataset.id))(event);
  });
  window.addEventListener("hashchange", () => {
    const id = location.hash.slice(1);
    if (id && id !== current) guarded(() => open(id))();
  });

  async function start() {
    let info;
    try {
      info = await api("GET", "info");
    } catch (error) {
      if (error.code !== "token_required") throw error;
      await authorize();
      info = await api("GET", "info");
    }
    ui.model.textContent = `Model: ${info.model}`;
    ui.input.maxLength = info.max_message_chars;
    ui.system.maxLength = info.max_system_prompt_chars;
    ui.system.value = info.default_system_prompt;
    const conversations = await loadList();
    const wanted = location.hash.slice(1);
    const id = conversations.some((c) => c.id === wanted) ? wanted : conversations[0]?.id;
    if (id) await open(id);
    ui.input.focus();
  }

  // "ready" once loading ended, well or not: a failure shows in the banner, never as a page that hangs.
  start().catch(showError).finally(() => { document.body.dataset.ready = "true"; });
})();
