// Progressive enhancement only: every page works without this file.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  // Forms that end something (log out, cancel a job, delete a dataset) ask first.
  document.querySelectorAll("form[data-confirm]").forEach((form) =>
    form.addEventListener("submit", (e) => { if (!window.confirm(form.dataset.confirm)) { e.preventDefault(); } }));

  // Role switcher submits on change.
  document.querySelectorAll("select[data-autosubmit]").forEach((el) =>
    el.addEventListener("change", () => el.form.submit()));

  // Drag-and-drop upload with a progress bar.
  const form = document.getElementById("upload-form");
  if (form) {
    const zone = document.getElementById("dropzone");
    const input = document.getElementById("file");
    const bar = document.getElementById("upload-progress");
    const out = document.getElementById("upload-result");
    ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.remove("over"); }));
    zone.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; } });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      if (!input.files.length) { out.textContent = "Choose a file first."; return; }
      const data = new FormData();
      const purpose = form.querySelector("input[name=purpose]:checked");
      data.append("purpose", purpose ? purpose.value : "fine-tune");
      const instancePrompt = form.querySelector("#instance_prompt");
      if (purpose && purpose.value === "fine-tune-images" && instancePrompt && instancePrompt.value.trim()) {
        data.append("instance_prompt", instancePrompt.value);
      }
      if (!purpose || purpose.value !== "fine-tune-images") {  // the quality report's tokenizer and length limit
        for (const name of ["model", "max_seq_length"]) {
          const field = form.querySelector("#" + name);
          if (field && field.value.trim()) { data.append(name, field.value.trim()); }
        }
      }
      data.append("file", input.files[0]);
      const project = form.querySelector("[data-query]");
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/datasets/upload" + (project ? "?project=" + encodeURIComponent(project.value) : ""));
      xhr.setRequestHeader("X-CSRF-Token", form.dataset.csrf);
      xhr.setRequestHeader("Accept", "application/json");
      bar.hidden = false; bar.value = 0; out.textContent = "Uploading…";
      xhr.upload.addEventListener("progress", (ev) => { if (ev.lengthComputable) { bar.value = Math.round(100 * ev.loaded / ev.total); } });
      xhr.upload.addEventListener("load", () => { out.textContent = "Scanning…"; });
      xhr.addEventListener("load", () => {
        let body = {};
        try { body = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
        if (xhr.status < 300 && body.redirect) { window.location = body.redirect; return; }
        const error = body.error || {};
        // The message says what is wrong and where, in words; several bad lines are listed one per item.
        const problems = Array.isArray(error.errors) && error.errors.length > 1 ? error.errors : [];
        out.textContent = problems.length
          ? error.message.split(":")[0] + ":"  // "N lines are not valid records:"
          : (error.message || ("Upload failed (" + xhr.status + ")"));
        if (problems.length) {
          const list = document.createElement("ul");
          for (const problem of problems) {
            const item = document.createElement("li");
            item.textContent = problem.message;
            list.appendChild(item);
          }
          out.appendChild(list);
        }
        out.className = "flash error";
      });
      xhr.addEventListener("error", () => { out.textContent = "The upload was interrupted."; out.className = "flash error"; });
      xhr.send(data);
    });
  }

  // Live job page: refresh the live section while the job runs.
  const live = document.querySelector("[data-refresh]");
  if (live) {
    const every = parseInt(live.dataset.refresh, 10) || 2000;
    const tick = async () => {
      try {
        const resp = await fetch(window.location.pathname, { headers: { Accept: "text/html" } });
        const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
        const fresh = doc.getElementById("live");
        if (fresh) { live.innerHTML = fresh.innerHTML; if (!fresh.dataset.refresh) { return; } }
      } catch (err) { /* try again */ }
      setTimeout(tick, every);
    };
    setTimeout(tick, every);
  }

  // Inline validation of hyperparameters: "auto" or a number within the server's range (data-min/max).
  const problemOf = (el) => {
    const v = el.value.trim();
    if (el.dataset.pattern !== undefined) {  // a name-like field: the server's own pattern and words
      const ok = v === "" || new RegExp("^(?:" + el.dataset.pattern + ")$").test(v);
      return ok ? "" : "must be " + el.dataset.expected + "; got " + v;
    }
    if (v === "" || (v === "auto" && !el.hasAttribute("data-optional"))) { return ""; }
    const n = Number(v);
    const lo = el.dataset.min, hi = el.dataset.max, whole = el.hasAttribute("data-integer");
    const above = el.hasAttribute("data-above");
    const from = lo === undefined ? "" : above ? " above " + lo : (hi !== undefined ? " from " : " of at least ") + lo;
    const what = (whole ? "a whole number" : "a number") + from +
      (hi === undefined ? "" : (above || lo === undefined ? " and at most " : " to ") + hi);
    const expected = (el.hasAttribute("data-optional") ? "empty or " : "\"auto\" or ") + what;
    const low = lo !== undefined && (above ? n <= Number(lo) : n < Number(lo));
    if (Number.isNaN(n) || (whole && !Number.isInteger(n)) || low ||
        (hi !== undefined && n > Number(hi))) { return "must be " + expected + "; got " + v; }
    return "";
  };
  const checkField = (el) => {
    const problem = problemOf(el);
    const msg = document.getElementById(el.id + "-err");
    if (msg) { msg.textContent = problem; }
    el.setAttribute("aria-invalid", problem ? "true" : "false");
    return problem;
  };
  document.querySelectorAll("input[data-validate]").forEach((el) => {
    el.addEventListener("input", () => checkField(el));
  });

  // Job form: show only the inputs of the chosen method (hidden ones are disabled, so not sent);
  // a base model of the other kind (language / image) re-renders the form with its own options.
  const jobForm = document.getElementById("job-form");
  if (jobForm) {
    const sync = () => {
      const checked = jobForm.querySelector("input[name=method]:checked");
      const method = checked ? checked.value : "";
      jobForm.querySelectorAll("[data-methods]").forEach((el) => {
        const on = !method || el.dataset.methods.split(" ").includes(method);
        el.hidden = !on;
        el.querySelectorAll("input, select, textarea").forEach((i) => { i.disabled = !on; });
      });
    };
    jobForm.querySelectorAll("input[name=method]").forEach((el) => el.addEventListener("change", sync));
    sync();
    // Every field checked at once before sending: a summary in words at the top, each problem by its field.
    jobForm.addEventListener("submit", (e) => {
      if (e.submitter && e.submitter.name === "step") { return; }
      const bad = [...jobForm.querySelectorAll("input[data-validate]:not([disabled])")]
        .map((el) => [el, checkField(el)]).filter(([, problem]) => problem);
      let summary = document.getElementById("form-summary");
      if (!bad.length) { if (summary) { summary.remove(); } return; }
      e.preventDefault();
      if (!summary) {
        summary = document.createElement("div");
        summary.id = "form-summary"; summary.className = "flash error"; summary.setAttribute("role", "alert");
        summary.tabIndex = -1;
        jobForm.prepend(summary);
      }
      summary.textContent = bad.length === 1 ? "One field needs fixing:" : bad.length + " fields need fixing:";
      const list = document.createElement("ul");
      for (const [el, problem] of bad) {
        const item = document.createElement("li");
        const link = document.createElement("a");
        link.href = "#" + el.id; link.textContent = el.name + " " + problem;
        item.append(link); list.append(item);
      }
      summary.append(list);
      summary.focus();
    });
    const model = jobForm.querySelector("#model");
    model.addEventListener("change", () => {
      const option = model.options[model.selectedIndex];
      if (option && option.dataset.kind !== jobForm.dataset.kind) {
        const step = document.createElement("input");
        step.type = "hidden"; step.name = "step"; step.value = "choose";
        jobForm.append(step);
        jobForm.querySelectorAll("[disabled]").forEach((i) => { i.disabled = false; });
        jobForm.submit();
      }
    });
  }

  // Playground: stream chat completions over server-sent events; optionally two models side by side.
  const chat = document.getElementById("chat-form");
  if (chat) {
    const log = document.getElementById("chat-log");
    const send = document.getElementById("send");
    const stop = document.getElementById("stop");
    const status = document.getElementById("chat-status");
    const histories = new Map();  // model -> its own conversation
    let controller = null;
    const add = (parent, role, content) => {
      const p = document.createElement("p"); p.className = "msg";
      const r = document.createElement("span"); r.className = "role"; r.textContent = role + ":";
      const c = document.createElement("span"); c.textContent = content;
      p.append(r, c); parent.append(p); return c;
    };
    stop.addEventListener("click", () => { if (controller) { controller.abort(); } });
    document.getElementById("clear").addEventListener("click", () => {
      if (controller) { controller.abort(); }
      histories.clear(); log.replaceChildren(); status.textContent = "";
    });
    // One model's answer streamed into `column`; returns false when the user stopped it.
    const answer = async (model, text, column) => {
      const system = chat.querySelector("#system").value.trim();
      const history = histories.get(model) || [];
      const messages = [...history, { role: "user", content: text }];
      const out = add(column, "assistant (" + model + ")", "");
      let stopped = false;
      try {
        const resp = await fetch("/playground/chat", {
          method: "POST", signal: controller.signal,
          headers: { "Content-Type": "application/json", "X-CSRF-Token": chat.dataset.csrf, Accept: "text/event-stream" },
          body: JSON.stringify({ model: model, stream: true,
                                 messages: system ? [{ role: "system", content: system }, ...messages] : messages,
                                 max_tokens: parseInt(chat.querySelector("#max_tokens").value, 10) || 256,
                                 temperature: parseFloat(chat.querySelector("#temperature").value) || 0 }),
        });
        if (!resp.ok) {
          let b = {}; try { b = await resp.json(); } catch (err) { /* */ }
          out.textContent = (b.error && b.error.message) || ("error " + resp.status); return true;
        }
        const reader = resp.body.getReader(); const dec = new TextDecoder(); let buf = "";
        for (;;) {
          const { value, done } = await reader.read(); if (done) { break; }
          buf += dec.decode(value, { stream: true });
          let idx;
          while ((idx = buf.indexOf("\n\n")) >= 0) {
            const line = buf.slice(0, idx).trim(); buf = buf.slice(idx + 2);
            if (!line.startsWith("data:")) { continue; }
            const payload = line.slice(5).trim(); if (payload === "[DONE]") { continue; }
            try { const chunk = JSON.parse(payload); const d = chunk.choices && chunk.choices[0] && chunk.choices[0].delta; if (d && d.content) { out.textContent += d.content; } } catch (err) { /* */ }
          }
        }
      } catch (err) {
        if (err.name === "AbortError") { stopped = true; out.textContent += " (stopped)"; }
        else { out.textContent += " (interrupted: " + err.message + ")"; }  // the connection broke: say so, go on
      }
      histories.set(model, [...messages, { role: "assistant", content: out.textContent }]);
      if (!out.textContent.trim()) { out.textContent = "(the model returned no text)"; out.classList.add("muted"); }
      return !stopped;
    };
    chat.addEventListener("submit", async (e) => {
      e.preventDefault();
      const prompt = chat.querySelector("#prompt");
      const text = prompt.value.trim();
      if (!text || send.disabled) { return; }
      const model = chat.querySelector("#model").value;
      const compare = chat.querySelector("#compare").value;
      const models = compare && compare !== model ? [model, compare] : [model];
      add(log, "user", text); prompt.value = "";
      const row = document.createElement("div"); row.className = models.length > 1 ? "grid2 exchange" : "exchange";
      const columns = models.map(() => { const c = document.createElement("div"); row.append(c); return c; });
      log.append(row);
      controller = new AbortController();
      send.disabled = true; stop.disabled = false;
      for (let i = 0; i < models.length; i++) {
        status.textContent = models.length > 1 ? "generating (" + (i + 1) + " of " + models.length + ")…" : "generating…";
        if (!(await answer(models[i], text, columns[i]))) { break; }
      }
      controller = null; send.disabled = false; stop.disabled = true; status.textContent = "";
      row.querySelectorAll(".msg").forEach((m) => { m.dataset.done = "1"; });  // all answered, Send is back
    });
  }
});
