// capstream view: the gallery. Static: the data are scripts next to this page (pages/*.js), loaded as
// the pages need them (a page opened from the file system may load scripts and images, not fetch files).
// Every text from the data is set as text, never as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  const state = { page: 0, errorsOnly: false, kind: "", prompt: "", query: "", sort: "source" };
  const blocks = new Map();
  const loading = new Map();
  let meta = null;
  let facets = null;
  let facetsLoading = null;
  let ids = null; // the rows selected, in the order shown (null: every row, in source order)
  let generation = 0; // a newer selection makes older, slower ones give up
  let opened = -1; // the place in the selection of the row open large (-1: none)

  window.capstream = {
    index(data) { meta = data; start(); },
    block(n, rows) { blocks.set(n, rows); },
    facets(data) { facets = data; },
  };

  // -- loading ----------------------------------------------------------------------------------------
  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => resolve();
      script.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(script);
    });
  }
  const pad = (n) => String(n).padStart(6, "0");
  function loadBlock(n) {
    if (blocks.has(n)) return Promise.resolve();
    if (!loading.has(n)) loading.set(n, loadScript(`pages/rows-${pad(n)}.js`));
    return loading.get(n);
  }
  function loadFacets() {
    if (facets) return Promise.resolve();
    if (!facetsLoading) facetsLoading = loadScript("pages/facets.js");
    return facetsLoading;
  }
  const rowAt = (r) => blocks.get(Math.floor(r / meta.block))[r % meta.block];
  const fmt = (n) => Number(n).toLocaleString("en");

  // -- which rows -------------------------------------------------------------------------------------
  const promptIndex = () => meta.prompts.findIndex((p) => p.name === state.prompt);
  const needsFacets = () => state.errorsOnly || state.kind || state.prompt || state.sort !== "source";

  function matches(r, kindCode, p) {
    const kinds = facets.k;
    if (p >= 0) {
      const k = kinds[p][r];
      if (state.errorsOnly && k <= 0) return false;
      return !kindCode || k === kindCode;
    }
    if (!state.errorsOnly && !kindCode) return true;
    for (let q = 0; q < kinds.length; q++) {
      if (kindCode ? kinds[q][r] === kindCode : kinds[q][r] > 0) return true;
    }
    return false;
  }

  function answerLength(r, p) {
    if (p >= 0) return facets.n[p][r];
    let total = 0;
    for (const lengths of facets.n) total += lengths[r];
    return total;
  }

  function textOf(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.map(textOf).join(" ");
    if (typeof value === "object") return Object.values(value).map(textOf).join(" ");
    return String(value);
  }

  function searchText(row, p) {
    const parts = [row.k, row.f || "", row.e || ""];
    row.a.forEach((answer, i) => {
      if (answer && (p < 0 || i === p)) parts.push(textOf(answer.v), answer.e || "");
    });
    return parts.join("\n").toLowerCase();
  }

  async function search(list, mine) {
    const words = state.query.toLowerCase().split(/\s+/).filter(Boolean);
    const p = promptIndex();
    const wanted = list ? new Set(list) : null;
    const found = new Set();
    const todo = [];
    for (let b = 0; b < meta.blocks; b++) todo.push(b);
    let done = 0;
    async function worker() {
      while (todo.length) {
        const b = todo.shift();
        await loadBlock(b);
        if (mine !== generation) return;
        for (const row of blocks.get(b)) {
          if (wanted && !wanted.has(row.r)) continue;
          const text = searchText(row, p);
          if (words.every((w) => text.includes(w))) found.add(row.r);
        }
        done++;
        $("shown").textContent = `searching: ${done} of ${meta.blocks} parts`;
      }
    }
    await Promise.all([worker(), worker(), worker(), worker()]);
    const order = list || [...found].sort((a, b) => a - b);
    return order.filter((r) => found.has(r));
  }

  async function select() {
    const mine = ++generation;
    let list = null;
    if (needsFacets()) {
      await loadFacets();
      if (mine !== generation) return;
      const kindCode = state.kind ? meta.kinds.indexOf(state.kind) + 1 : 0;
      const p = promptIndex();
      list = [];
      for (let r = 0; r < meta.rows; r++) if (matches(r, kindCode, p)) list.push(r);
      if (state.sort !== "source") {
        const sign = state.sort === "long" ? -1 : 1;
        list.sort((a, b) => sign * (answerLength(a, p) - answerLength(b, p)) || a - b);
      }
    }
    if (state.query.trim()) list = await search(list, mine);
    if (mine !== generation) return;
    ids = list;
    await render();
  }

  // -- the page ---------------------------------------------------------------------------------------
  const count = () => (ids ? ids.length : meta.rows);
  const pages = () => Math.max(1, Math.ceil(count() / meta.page));

  async function render() {
    const mine = generation;
    state.page = Math.min(Math.max(0, state.page), pages() - 1);
    const first = state.page * meta.page;
    const shown = [];
    for (let i = first; i < Math.min(count(), first + meta.page); i++) shown.push(ids ? ids[i] : i);
    await Promise.all([...new Set(shown.map((r) => Math.floor(r / meta.block)))].map(loadBlock));
    if (mine !== generation) return;
    const grid = $("grid");
    grid.replaceChildren(...shown.map((r) => card(rowAt(r))));
    if (!shown.length) grid.replaceChildren(el("p", "empty", meta.rows ? "No row matches." : "No row is done yet."));
    $("page-info").textContent = `page ${fmt(state.page + 1)} of ${fmt(pages())}`;
    $("goto").value = state.page + 1;
    $("goto").max = pages();
    $("prev").disabled = state.page === 0;
    $("next").disabled = state.page >= pages() - 1;
    const filtered = ids ? ` (of ${fmt(meta.rows)})` : "";
    $("shown").textContent = count()
      ? `rows ${fmt(first + 1)}\u2013${fmt(first + shown.length)} of ${fmt(count())}${filtered}` : `0 rows${filtered}`;
    writeHash();
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function kindOf(error) {
    const i = error.indexOf(":");
    return i > 0 ? [error.slice(0, i), error.slice(i + 1).trim()] : ["Error", error];
  }

  function errorBox(error, className) {
    const box = el("div", className || "error");
    const [kind, message] = kindOf(error);
    box.append(el("span", "kind", kind), el("span", "message", message));
    return box;
  }

  function valueNode(value, prompt, full) {
    if (value === null || value === undefined) return el("div", "value none", "no answer");
    if (prompt.fields && typeof value === "object" && !Array.isArray(value)) {
      const list = el("dl", "fields");
      for (const name of prompt.fields) {
        const v = value[name];
        const dd = el("dd");
        if (Array.isArray(v)) {
          dd.className = "tags";
          for (const item of v) dd.append(el("span", "tag", textOf(item)));
        } else {
          dd.textContent = v === null || v === undefined ? "\u2014" : textOf(v);
        }
        list.append(el("dt", null, name), dd);
      }
      return list;
    }
    return el("div", full ? "value full" : "value", textOf(value));
  }

  function answersNode(row, full) {
    const box = el("div", "answers");
    const p = promptIndex();
    let errorShown = false;
    meta.prompts.forEach((prompt, i) => {
      if (p >= 0 && i !== p) return;
      const answer = row.a[i];
      const part = el("div", "answer");
      if (meta.prompts.length > 1) part.append(el("div", "prompt-name", prompt.name));
      if (!answer) {
        part.append(el("div", "value none", "not answered yet"));
      } else {
        part.append(valueNode(answer.v, prompt, full));
        if (answer.e) { part.append(errorBox(answer.e)); errorShown = true; }
        if (full) part.append(detailsNode(answer));
      }
      box.append(part);
    });
    if (!errorShown && row.e && p < 0) box.append(errorBox(row.e));
    return box;
  }

  function detailsNode(answer) {
    const facts = [];
    if (answer.ti !== undefined || answer.to !== undefined) facts.push(["tokens in / out", `${fmt(answer.ti || 0)} / ${fmt(answer.to || 0)}`]);
    if (answer.ms !== undefined) facts.push(["latency", `${fmt(answer.ms)} ms`]);
    if (answer.n !== undefined) facts.push(["attempts", String(answer.n)]);
    if (answer.m) facts.push(["model", answer.m]);
    if (answer.fr) facts.push(["finish reason", answer.fr]);
    if (answer.t !== undefined) facts.push(["answered", new Date(answer.t * 1000).toLocaleString()]);
    if (!facts.length) return el("p", "note", "tokens and latency: not recorded for this answer");
    const table = el("table", "facts");
    for (const [name, value] of facts) {
      const tr = el("tr");
      tr.append(el("th", null, name), el("td", null, value));
      table.append(tr);
    }
    return table;
  }

  function imageNode(row, large) {
    const src = large ? row.g || row.t : row.t;
    if (src) {
      const img = el("img", large ? "large" : "thumb");
      img.src = src;
      img.alt = row.f || row.k;
      img.decoding = "async";
      return img;
    }
    // No thumbnail: the row's error says why (ImageError), else the viewer's own note.
    return row.e && !row.t ? errorBox(row.e, "image-error") : el("div", "image-missing", row.in || "no image");
  }

  function keyNode(row) {
    const line = el("div", "key");
    line.append(el("span", "row-key", row.k));
    if (row.f && row.f !== row.k) line.append(el("span", "file", row.f));
    if (!row.w) line.append(el("span", "pending", "not written yet"));
    return line;
  }

  function card(row) {
    const node = el("article", row.e ? "card has-error" : "card");
    node.dataset.row = row.r;
    node.tabIndex = 0;
    const figure = el("div", "image");
    figure.append(imageNode(row, false));
    node.append(figure, keyNode(row), answersNode(row, false));
    node.addEventListener("click", () => openAt(indexOf(row.r)));
    node.addEventListener("keydown", (event) => { if (event.key === "Enter") openAt(indexOf(row.r)); });
    return node;
  }

  function indexOf(r) {
    if (!ids) return r;
    const first = state.page * meta.page; // the row is on the page shown: look there first
    const near = ids.indexOf(r, first);
    return near >= 0 ? near : ids.indexOf(r);
  }

  // The row at place i of the selection, large; the arrow keys move to the previous and next ones.
  async function openAt(i) {
    if (i < 0 || i >= count()) return;
    const r = ids ? ids[i] : i;
    await loadBlock(Math.floor(r / meta.block));
    opened = i;
    open(rowAt(r));
  }

  function open(row) {
    const body = $("detail-body");
    const where = row.x !== undefined ? `position ${fmt(row.x)} in the source, chunk ${row.c}` : `chunk ${row.c}`;
    const head = el("div", "detail-head");
    head.append(keyNode(row), el("div", "where", where + (row.w ? "" : " (not written yet: from the results log)")));
    const figure = el("div", "detail-image");
    figure.append(imageNode(row, true));
    body.replaceChildren(head, figure, answersNode(row, true));
    if (row.e) body.append(el("h3", null, "error"), el("pre", "error-full", row.e));
    if (!$("detail").open) $("detail").showModal();
  }

  // -- state in the address, so that a view can be linked to ----------------------------------------
  function writeHash() {
    const params = new URLSearchParams();
    if (state.page) params.set("page", state.page + 1);
    if (state.errorsOnly) params.set("errors", "1");
    if (state.kind) params.set("kind", state.kind);
    if (state.prompt) params.set("prompt", state.prompt);
    if (state.query) params.set("q", state.query);
    if (state.sort !== "source") params.set("sort", state.sort);
    const hash = params.toString();
    history.replaceState(null, "", hash ? "#" + hash : location.pathname + location.search);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    state.page = Math.max(0, (parseInt(params.get("page"), 10) || 1) - 1);
    state.errorsOnly = params.get("errors") === "1";
    state.kind = meta.kinds.includes(params.get("kind")) ? params.get("kind") : "";
    state.prompt = meta.prompts.some((p) => p.name === params.get("prompt")) ? params.get("prompt") : "";
    state.query = params.get("q") || "";
    state.sort = ["long", "short"].includes(params.get("sort")) ? params.get("sort") : "source";
  }

  // -- start ------------------------------------------------------------------------------------------
  function statusText() {
    const parts = [];
    if (meta.complete) parts.push("complete");
    else parts.push(meta.stopped ? `not complete (stopped: ${meta.stopped})` : "not complete (running, or stopped)");
    parts.push(`${fmt(meta.rows)} rows`);
    if (meta.pending) parts.push(`${fmt(meta.pending)} of them in chunks not written yet`);
    parts.push(`${fmt(meta.errors)} error rows`);
    parts.push(`model ${meta.model} (${meta.endpoint})`);
    parts.push(`view made ${meta.generated}`);
    return parts.join(" \u00b7 ");
  }

  function syncControls() {
    $("errors-only").setAttribute("aria-pressed", String(state.errorsOnly));
    $("kind").value = state.kind;
    $("prompt").value = state.prompt;
    $("search").value = state.query;
    $("sort").value = state.sort;
  }

  function start() {
    document.title = `${meta.title}: capstream view`;
    $("title").textContent = meta.title;
    $("status").textContent = statusText();
    $("error-count").textContent = fmt(meta.errors);
    for (const [kind, n] of Object.entries(meta.by_kind)) {
      const option = el("option", null, `${kind} (${fmt(n)})`);
      option.value = kind;
      $("kind").append(option);
    }
    if (meta.prompts.length > 1) {
      $("prompt-control").hidden = false;
      for (const prompt of meta.prompts) {
        const option = el("option", null, prompt.name);
        option.value = prompt.name;
        $("prompt").append(option);
      }
    }
    readHash();
    syncControls();
    let typing = null;
    const reselect = () => {
      clearTimeout(typing); // what is in the search box counts now, typed a moment ago or not
      state.query = $("search").value;
      state.page = 0;
      syncControls();
      select();
    };
    $("errors-only").addEventListener("click", () => { state.errorsOnly = !state.errorsOnly; reselect(); });
    $("kind").addEventListener("change", (e) => { state.kind = e.target.value; reselect(); });
    $("prompt").addEventListener("change", (e) => { state.prompt = e.target.value; reselect(); });
    $("sort").addEventListener("change", (e) => { state.sort = e.target.value; reselect(); });
    $("search").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(reselect, 250);
    });
    window.addEventListener("hashchange", () => { readHash(); syncControls(); select(); }); // a link edited by hand
    $("prev").addEventListener("click", () => { state.page--; render(); });
    $("next").addEventListener("click", () => { state.page++; render(); });
    $("goto").addEventListener("change", (e) => { state.page = (parseInt(e.target.value, 10) || 1) - 1; render(); });
    const dialog = $("detail");
    $("close").addEventListener("click", () => dialog.close());
    dialog.addEventListener("click", (e) => { // a click on the backdrop, outside the box, closes it
      const box = dialog.getBoundingClientRect();
      if (e.clientX < box.left || e.clientX > box.right || e.clientY < box.top || e.clientY > box.bottom) dialog.close();
    });
    dialog.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight") openAt(opened + 1);
      if (e.key === "ArrowLeft") openAt(opened - 1);
    });
    dialog.addEventListener("close", () => { opened = -1; });
    select();
  }
})();
