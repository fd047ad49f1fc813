// The Studios console: the list, the detail view and the forms, drawn from the REST API
// (controller/openapi.yaml), with live updates from GET /studios/events. No framework: the
// server holds every rule; this only shows its answers and posts what a person chose.
"use strict";

const RANK = { view: 0, connect: 1, launch: 2, maintain: 3, admin: 4, owner: 5 };
const PAGE = 50;
const BUSY = new Set(["starting", "building", "stopping"]);

const state = {
  csrf: document.querySelector("meta[name=studios-csrf]").content,
  user: JSON.parse(document.querySelector("meta[name=studios-user]").content),
  workspaces: [],
  ws: null,
  role: "view",
  list: { search: "", offset: 0, total: 0, rows: new Map(), order: [] },
  view: "list",
  detail: null,
  events: null,
  reloadTimer: null,
};

// ------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(method, path, body) {
  // No custom header on GETs: the page's preload of the first list page must match this request.
  const headers = {};
  if (method !== "GET") headers["X-Studios-CSRF"] = state.csrf;
  const opts = { method, headers, credentials: "same-origin" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let data = null;
  if (text && (r.headers.get("Content-Type") || "").includes("json")) data = JSON.parse(text);
  if (!r.ok) {
    const err = new Error((data && data.message) || `${method} ${path}: HTTP ${r.status}`);
    err.status = r.status;
    throw err;
  }
  return data;
}

function wsq(extra) {
  const q = new URLSearchParams({ workspaceId: String(state.ws), ...(extra || {}) });
  return q.toString();
}

function announce(text) {
  document.getElementById("live").textContent = text;
}

function notice(text, kind) {
  const box = document.getElementById("notice");
  if (!box) return;
  box.replaceChildren(text ? h("p", { class: `notice ${kind || "error"}`, role: kind === "ok" ? "status" : "alert" }, text) : "");
}

async function act(label, fn) {
  try {
    await fn();
    notice(`${label}: done`, "ok");
  } catch (e) {
    notice(`${label} failed: ${e.message}`);
  }
}

function when(iso) {
  if (!iso) return "never";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function initials(name) {
  const parts = (name || "?").split(/[\s._@-]+/).filter(Boolean);
  return ((parts[0] || "?")[0] + (parts.length > 1 ? parts[1][0] : "")).toUpperCase();
}

function avatars(conns) {
  return h(
    "span",
    { class: "avatars" },
    (conns || []).map((c) => {
      const who = c.userName || c.email || `user ${c.id}`;
      return h(
        "span",
        { class: "avatar", title: who, role: "img", "aria-label": `${who} is connected`, "data-user": who },
        c.avatar && c.avatar.startsWith("data:") ? h("img", { src: c.avatar, alt: "" }) : initials(who)
      );
    })
  );
}

function statusBadge(s) {
  const status = s.statusInfo.status;
  const step = (s.progress || []).find((p) => p.status === "in-progress");
  return h(
    "span",
    { class: "status-cell" },
    h("span", { class: `status ${status}`, "data-status": status }, status),
    step ? h("span", { class: "step" }, step.message) : null
  );
}

// ------------------------------------------------------------------ permissions (studio-roles.md)

function rank() {
  return RANK[state.role] ?? 0;
}

function mayPrivate(s) {
  if (!s.isPrivate) return true;
  if (s.user && s.user.id === state.user.id) return true;
  return (s.allowedUsers || []).some((u) => u.id === state.user.id);
}

const may = {
  connect: (s) => rank() >= RANK.connect && mayPrivate(s),
  execute: (s) => rank() >= RANK.maintain && (mayPrivate(s) || rank() >= RANK.admin),
  write: (s) => rank() >= RANK.maintain && (mayPrivate(s) || rank() >= RANK.admin),
  clone: (s) => rank() >= RANK.maintain && mayPrivate(s),
  add: () => rank() >= RANK.maintain,
};

async function start(s) {
  await act(`Start ${s.name}`, () => api("PUT", `/studios/${s.sessionId}/start?${wsq()}`));
}
async function stop(s) {
  await act(`Stop ${s.name}`, () => api("PUT", `/studios/${s.sessionId}/stop?${wsq()}`));
}
async function cancel(s) {
  await act(`Cancel ${s.name}`, () => api("POST", `/studios/${s.sessionId}/cancel?${wsq()}`));
}
async function remove(s) {
  if (!window.confirm(`Delete studio "${s.name}"? Its checkpoints are deleted with it.`)) return;
  await act(`Delete ${s.name}`, async () => {
    await api("DELETE", `/studios/${s.sessionId}?${wsq()}`);
    if (state.view === "detail") location.hash = "#/";
  });
}

function actionButtons(s) {
  const status = s.statusInfo.status;
  const out = [];
  const label = (verb) => `${verb} ${s.name}`;
  if (status === "running" && may.connect(s)) {
    out.push(h("a", { class: "button primary", href: s.studioUrl, target: "_blank", rel: "noopener", "aria-label": label("Connect to") }, "Connect"));
  }
  if (may.execute(s)) {
    if (["stopped", "errored", "buildFailed"].includes(status))
      out.push(h("button", { type: "button", "aria-label": label("Start"), onclick: () => start(s) }, "Start"));
    if (status === "running") out.push(h("button", { type: "button", "aria-label": label("Stop"), onclick: () => stop(s) }, "Stop"));
    if (status === "starting" || status === "building")
      out.push(h("button", { type: "button", "aria-label": label("Cancel start of"), onclick: () => cancel(s) }, "Cancel"));
  }
  if (may.clone(s)) out.push(h("a", { class: "button", href: `#/new/${s.sessionId}`, "aria-label": label("Add as new from") }, "Add as new"));
  if (may.write(s) && status === "stopped")
    out.push(h("a", { class: "button", href: `#/edit/${s.sessionId}`, "aria-label": label("Edit") }, "Edit"));
  if (may.write(s) && ["stopped", "errored", "buildFailed"].includes(status))
    out.push(h("button", { type: "button", class: "danger", "aria-label": label("Delete"), onclick: () => remove(s) }, "Delete"));
  return h("span", { class: "actions" }, out);
}

// ------------------------------------------------------------------ list

function row(s) {
  return h(
    "tr",
    { "data-session": s.sessionId },
    h("td", { "data-label": "Name" }, h("a", { href: `#/studio/${s.sessionId}` }, s.name), s.isPrivate ? h("span", { class: "muted" }, " (private)") : null),
    h("td", { "data-label": "Template" }, s.template.tool),
    h("td", { "data-label": "Author" }, (s.user && s.user.userName) || ""),
    h("td", { "data-label": "Compute env" }, s.computeEnv ? s.computeEnv.name : ""),
    h("td", { "data-label": "Status" }, statusBadge(s)),
    h("td", { "data-label": "Connected" }, avatars(s.activeConnections)),
    h("td", { "data-label": "Last started" }, when(s.lastStarted)),
    h("td", {}, actionButtons(s))
  );
}

function listView() {
  const L = state.list;
  const search = h("input", {
    id: "search",
    type: "search",
    value: L.search,
    placeholder: "name, status:running, userId:alice, computeEnvId:…, label:…",
    "aria-describedby": "search-help",
  });
  const statusFilter = h(
    "select",
    { id: "status-filter" },
    h("option", { value: "" }, "any status"),
    ["running", "starting", "building", "stopping", "stopped", "errored", "buildFailed"].map((s) => h("option", { value: s }, s))
  );
  const mine = h("input", { type: "checkbox", id: "mine" });
  const apply = () => {
    const words = search.value.trim();
    const parts = [words];
    if (statusFilter.value) parts.push(`status:${statusFilter.value}`);
    if (mine.checked) parts.push(`userId:${state.user.id}`);
    L.search = parts.filter(Boolean).join(" ");
    L.offset = 0;
    loadList();
  };
  let timer = null;
  search.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(apply, 120);
  });
  statusFilter.addEventListener("change", apply);
  mine.addEventListener("change", apply);
  const body = h("tbody", { id: "rows" });
  const table = h(
    "table",
    { class: "studios" },
    h("caption", { class: "sr-only" }, "Studios of the workspace"),
    h("thead", {}, h("tr", {}, ["Name", "Template", "Author", "Compute env", "Status", "Connected", "Last started", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
    body
  );
  return h(
    "section",
    { "aria-labelledby": "list-title" },
    h("h2", { id: "list-title" }, "Studios"),
    h("div", { id: "notice" }),
    h(
      "form",
      { class: "toolbar", role: "search", onsubmit: (e) => { e.preventDefault(); apply(); } },
      h("label", { class: "grow" }, "Search", search),
      h("label", {}, "Status", statusFilter),
      h("label", { class: "check" }, h("span", {}, "Mine only"), mine),
      may.add() ? h("a", { class: "button primary", href: "#/new" }, "Add studio") : null
    ),
    h("p", { id: "search-help", class: "hint" }, "Free text matches names and templates; status:, userId: (id or user name), computeEnvId: and label: filter."),
    table,
    h(
      "nav",
      { class: "pager", "aria-label": "Pages" },
      h("button", { type: "button", id: "prev", onclick: () => { L.offset = Math.max(0, L.offset - PAGE); loadList(); } }, "Previous"),
      h("span", { id: "range", "aria-live": "polite" }),
      h("button", { type: "button", id: "next", onclick: () => { L.offset += PAGE; loadList(); } }, "Next")
    )
  );
}

function drawRows() {
  const L = state.list;
  const body = document.getElementById("rows");
  if (!body) return;
  body.replaceChildren(...L.order.map((id) => row(L.rows.get(id))));
  if (!L.order.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No studios match.")));
  const first = L.total ? L.offset + 1 : 0;
  document.getElementById("range").textContent = `${first}–${L.offset + L.order.length} of ${L.total}`;
  document.getElementById("prev").disabled = L.offset === 0;
  document.getElementById("next").disabled = L.offset + PAGE >= L.total;
}

let listSeq = 0;
async function loadList() {
  const L = state.list;
  const seq = ++listSeq;
  const q = { max: String(PAGE), offset: String(L.offset) };
  if (L.search) q.search = L.search;
  try {
    const data = await api("GET", `/studios?${wsq(q)}`);
    if (seq !== listSeq) return; // a newer search answered first
    L.total = data.totalSize;
    L.rows = new Map(data.studios.map((s) => [s.sessionId, s]));
    L.order = data.studios.map((s) => s.sessionId);
    drawRows();
    document.body.dataset.listLoaded = String(seq);
  } catch (e) {
    notice(`Listing studios failed: ${e.message}`);
  }
}

// ------------------------------------------------------------------ detail

function props(pairs) {
  return h("dl", { class: "props" }, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function liveCard(s) {
  const status = s.statusInfo.status;
  const lifespan = s.effectiveLifespanHours ? `${s.effectiveLifespanHours} h` : "no limit";
  return h(
    "div",
    { class: "card", id: "live-card" },
    h("h3", {}, "Status"),
    props([
      ["Status", statusBadge(s)],
      ["Since", when(s.statusInfo.lastUpdate)],
      ["Message", s.statusInfo.message],
      ["Stop reason", s.statusInfo.stopReason],
      ["Connected", avatars(s.activeConnections)],
      ["Lifespan", lifespan],
    ]),
    status === "errored" || status === "buildFailed" ? h("p", { class: "notice error", role: "alert" }, `Error: ${s.statusInfo.message || status}`) : null,
    (s.progress || []).length
      ? h("div", {}, h("h3", {}, "Progress"), h("ol", { class: "progress" }, s.progress.map((p) => h("li", {}, `${p.message} — ${p.status}`, (p.warnings || []).length ? h("span", { class: "step" }, p.warnings.join("; ")) : null))))
      : null,
    h("p", { class: "actions" }, actionButtons(s), status === "running" && may.execute(s) ? h("button", { type: "button", onclick: () => act("Extend lifespan", () => api("POST", `/studios/${s.sessionId}/lifespan?${wsq()}`)) }, "Extend lifespan") : null)
  );
}

function checkpointsCard(s, checkpoints) {
  const rows = checkpoints.map((c) => {
    const name = h("span", { class: "cp-name" }, c.name);
    const cells = [
      h("td", { "data-label": "Name" }, name),
      h("td", { "data-label": "Saved" }, when(c.dateSaved || c.dateCreated)),
      h("td", { "data-label": "Author" }, c.author ? c.author.userName || `user ${c.author.id}` : ""),
      h("td", { "data-label": "Status" }, c.status),
    ];
    const acts = h("td", { class: "actions" });
    if (rank() >= RANK.maintain) {
      acts.append(
        h("button", {
          type: "button",
          "aria-label": `Rename checkpoint ${c.name}`,
          onclick: () => {
            const input = h("input", { value: c.name, "aria-label": `New name of checkpoint ${c.name}`, maxlength: 200 });
            const form = h(
              "form",
              {
                class: "actions",
                onsubmit: async (e) => {
                  e.preventDefault();
                  await act("Rename checkpoint", async () => {
                    await api("PUT", `/studios/${s.sessionId}/checkpoints/${c.id}?${wsq()}`, { name: input.value });
                    await loadDetail(s.sessionId);
                  });
                },
              },
              input,
              h("button", { type: "submit", class: "primary" }, "Save")
            );
            name.replaceChildren(form);
            input.focus();
          },
        }, "Rename")
      );
    }
    if (may.clone(s)) acts.append(h("a", { class: "button", href: `#/new/${s.sessionId}/${c.id}`, "aria-label": `Add as new from checkpoint ${c.name}` }, "Add as new"));
    return h("tr", { "data-checkpoint": c.id }, cells, acts);
  });
  return h(
    "div",
    { class: "card" },
    h("h3", {}, "Checkpoints"),
    checkpoints.length
      ? h("table", { class: "studios" }, h("thead", {}, h("tr", {}, ["Name", "Saved", "Author", "Status", "Actions"].map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows))
      : h("p", { class: "muted" }, "No checkpoints yet: one is saved when the studio stops.")
  );
}

function detailView(s, checkpoints, build) {
  const c = s.configuration || {};
  const parent = s.parentCheckpoint;
  return h(
    "section",
    { "aria-labelledby": "detail-title" },
    h("p", {}, h("a", { href: "#/" }, "← All studios")),
    h("h2", { id: "detail-title" }, s.name),
    s.description ? h("p", {}, s.description) : null,
    h("div", { id: "notice" }),
    h(
      "div",
      { class: "cards" },
      liveCard(s),
      h(
        "div",
        { class: "card" },
        h("h3", {}, "Configuration"),
        props([
          ["Template", s.template.repository],
          ["Template status", s.template.status],
          ["Author", s.user && s.user.userName],
          ["Private", s.isPrivate ? "yes" : "no"],
          ["CPUs", c.cpu],
          ["Memory", c.memory ? `${c.memory} MiB` : null],
          ["GPUs", c.gpu],
          ["Lifespan setting", c.lifespanHours !== undefined ? `${c.lifespanHours} h` : null],
          ["Created", when(s.dateCreated)],
          ["Last started", when(s.lastStarted)],
          ["Added as new from", parent ? h("a", { href: `#/studio/${parent.sessionId}` }, `${parent.studioName}, checkpoint ${parent.checkpointName}`) : null],
        ])
      ),
      h(
        "div",
        { class: "card" },
        h("h3", {}, "Compute environment"),
        s.computeEnv ? props([["Name", s.computeEnv.name], ["Id", s.computeEnv.id], ["Platform", s.computeEnv.platform], ["Work dir", s.computeEnv.workDir]]) : h("p", { class: "muted" }, "none")
      ),
      h(
        "div",
        { class: "card" },
        h("h3", {}, "Data-links"),
        (s.mountedDataLinks || []).length
          ? h("ul", {}, s.mountedDataLinks.map((d) => h("li", {}, `${d.name} `, h("span", { class: "muted" }, `${d.mountPath || ""} ${d.readOnly ? "read-only" : "read-write"} · ${d.mountState || "not mounted"}${d.message ? " · " + d.message : ""}`))))
          : h("p", { class: "muted" }, "none")
      )
    ),
    build
      ? h(
          "div",
          { class: "card" },
          h("h3", {}, "Custom environment build"),
          props([["Build", build.status], ["Step", build.progress], ["Image", build.image], ["Duration", build.durationSeconds ? `${build.durationSeconds} s` : null]]),
          build.log ? h("pre", { class: "log", tabindex: 0, "aria-label": "Build log" }, build.log) : null
        )
      : null,
    h("div", { id: "checkpoints" }, checkpointsCard(s, checkpoints))
  );
}

async function loadDetail(sid) {
  const s = await api("GET", `/studios/${encodeURIComponent(sid)}?${wsq()}`);
  const cps = await api("GET", `/studios/${encodeURIComponent(sid)}/checkpoints?${wsq({ max: "100" })}`);
  let build = null;
  if (s.configuration && s.configuration.condaEnvironment) {
    build = await api("GET", `/studios/${encodeURIComponent(sid)}/build?${wsq()}`).catch(() => null);
  }
  state.detail = { s, checkpoints: cps.checkpoints, build };
  if (state.view === "detail") show(detailView(s, cps.checkpoints, build));
}

// ------------------------------------------------------------------ add / add as new / edit

async function formView(mode, sid, checkpointId) {
  const [templates, envs, links] = await Promise.all([
    api("GET", `/studios/templates?${wsq()}`),
    api("GET", `/compute-envs?${wsq()}`),
    api("GET", `/data-links?${wsq({ max: "100" })}`).catch(() => ({ dataLinks: [] })),
  ]);
  let parent = null;
  let checkpoint = null;
  if (sid) {
    parent = await api("GET", `/studios/${encodeURIComponent(sid)}?${wsq()}`);
    if (mode === "clone") {
      const cps = (await api("GET", `/studios/${encodeURIComponent(sid)}/checkpoints?${wsq({ max: "100" })}`)).checkpoints;
      checkpoint = checkpointId ? cps.find((c) => String(c.id) === String(checkpointId)) : cps[0];
      if (!checkpoint) throw new Error(`studio ${parent.name} has no checkpoint to add as new from yet`);
    }
  }
  const pc = (parent && parent.configuration) || {};
  const inherited = mode === "clone";
  const field = (label, input, hint) => h("label", {}, label, input, hint || null);
  const name = h("input", { name: "name", required: true, maxlength: 80, autocomplete: "off", "aria-describedby": "name-hint", value: mode === "edit" ? parent.name : inherited ? `${parent.name}-copy` : "" });
  const nameHint = h("span", { id: "name-hint", class: "hint", "aria-live": "polite" }, "1 to 80 characters, unique in the workspace");
  const description = h("textarea", { name: "description", rows: 2 }, parent && mode === "edit" ? parent.description || "" : "");
  const template = h(
    "select",
    { name: "template", disabled: inherited || mode === "edit" },
    templates.templates.map((t) => h("option", { value: t.repository, selected: parent && parent.template.repository === t.repository }, `${t.tool} — ${t.repository}${t.status ? ` (${t.status})` : ""}`))
  );
  const env = h(
    "select",
    { name: "computeEnv", disabled: inherited },
    envs.computeEnvs.map((e) => h("option", { value: e.id, selected: parent ? parent.computeEnv && parent.computeEnv.id === e.id : e.primary }, `${e.name} (${e.platform})`))
  );
  const num = (n, v) => h("input", { name: n, type: "number", min: 0, inputmode: "numeric", value: v ?? "" });
  const cpu = num("cpu", pc.cpu);
  const memory = num("memory", pc.memory);
  const gpu = num("gpu", pc.gpu);
  const lifespan = h("input", { name: "lifespan", type: "number", min: 0, value: pc.lifespanHours ?? "", disabled: inherited });
  const mounted = new Set(((pc.mountDataV2 || []).map((m) => m.dataLinkId)));
  const linkBoxes = (links.dataLinks || []).map((l) => h("label", { class: "check" }, h("input", { type: "checkbox", name: "link", value: l.id, checked: mounted.has(l.id) }), `${l.name} (${l.resourceRef || l.type})`));
  const isPrivate = h("input", { type: "checkbox", name: "private", checked: parent ? parent.isPrivate : false, disabled: mode === "edit" });
  const autoStart = h("input", { type: "checkbox", name: "autoStart", checked: mode !== "edit" });
  const title = mode === "edit" ? `Edit ${parent.name}` : inherited ? `Add as new from ${parent.name}` : "Add studio";

  let validateSeq = 0;
  let validateTimer = null;
  name.addEventListener("input", () => {
    clearTimeout(validateTimer);
    const value = name.value;
    validateTimer = setTimeout(async () => {
      const seq = ++validateSeq;
      if (mode === "edit" && value === parent.name) return;
      try {
        await api("GET", `/studios/validate?${wsq({ name: value })}`);
        if (seq !== validateSeq) return;
        nameHint.className = "hint good";
        nameHint.textContent = "Name available";
        name.setAttribute("aria-invalid", "false");
      } catch (e) {
        if (seq !== validateSeq) return;
        nameHint.className = "hint bad";
        nameHint.textContent = e.message;
        name.setAttribute("aria-invalid", "true");
      }
    }, 200);
  });

  const submit = async (e) => {
    e.preventDefault();
    const configuration = {};
    for (const [k, input] of [["cpu", cpu], ["memory", memory], ["gpu", gpu]]) if (input.value !== "") configuration[k] = Number(input.value);
    if (!inherited && lifespan.value !== "") configuration.lifespanHours = Number(lifespan.value);
    const chosen = linkBoxes.map((l) => l.querySelector("input")).filter((i) => i.checked).map((i) => ({ dataLinkId: i.value }));
    if (chosen.length || mounted.size) configuration.mountDataV2 = chosen;
    await act(title, async () => {
      if (mode === "edit") {
        await api("PUT", `/studios/${parent.sessionId}?${wsq()}`, { name: name.value, description: description.value || null, computeEnvId: env.value, configuration });
        location.hash = `#/studio/${parent.sessionId}`;
        return;
      }
      const body = { name: name.value, computeEnvId: env.value, description: description.value || undefined, configuration, isPrivate: isPrivate.checked };
      if (inherited) body.initialCheckpointId = checkpoint.id;
      else body.dataStudioToolUrl = template.value;
      const made = await api("POST", `/studios?${wsq({ autoStart: String(autoStart.checked) })}`, body);
      location.hash = `#/studio/${made.studio.sessionId}`;
    });
  };

  return h(
    "section",
    { "aria-labelledby": "form-title" },
    h("p", {}, h("a", { href: parent ? `#/studio/${parent.sessionId}` : "#/" }, "← Back")),
    h("h2", { id: "form-title" }, title),
    h("div", { id: "notice" }),
    inherited ? h("p", { class: "hint" }, "Inherited from the parent and fixed: template ", h("span", { class: "fixed" }, parent.template.repository), ", compute environment ", h("span", { class: "fixed" }, parent.computeEnv ? parent.computeEnv.name : ""), ", lifespan and conda environment; restores checkpoint ", h("span", { class: "fixed", id: "from-checkpoint" }, checkpoint.name), ".") : null,
    h(
      "form",
      { class: "studio", onsubmit: submit, novalidate: true },
      field("Name", name, nameHint),
      field("Description", description),
      field("Template", template, h("span", { class: "hint" }, "Recommended, deprecated or experimental as the catalogue says")),
      field("Compute environment", env),
      h("fieldset", {}, h("legend", {}, "Resources"), h("div", { class: "row" }, field("CPUs", cpu), field("Memory (MiB)", memory), field("GPUs", gpu))),
      field("Lifespan (hours, 0: no limit)", lifespan),
      linkBoxes.length ? h("fieldset", {}, h("legend", {}, "Data-links"), linkBoxes) : null,
      mode === "edit" ? null : h("label", { class: "check" }, isPrivate, "Private (only you can connect)"),
      mode === "edit" ? null : h("label", { class: "check" }, autoStart, "Start it now"),
      h("p", {}, h("button", { type: "submit", class: "primary" }, mode === "edit" ? "Save" : "Add"))
    )
  );
}

// ------------------------------------------------------------------ live updates

function connectEvents() {
  if (state.events) state.events.close();
  const es = new EventSource(`/studios/events?${wsq()}`);
  state.events = es;
  let connected = false;
  es.addEventListener("ready", () => {
    document.body.dataset.live = "on";
    // A reconnection: anything that changed meanwhile was missed, so read the page again.
    if (connected && state.view === "list") loadList();
    connected = true;
  });
  es.addEventListener("studio", (ev) => {
    const s = JSON.parse(ev.data);
    const L = state.list;
    if (state.view === "list") {
      if (L.rows.has(s.sessionId)) {
        const before = L.rows.get(s.sessionId).statusInfo.status;
        L.rows.set(s.sessionId, s);
        const tr = document.querySelector(`tr[data-session="${s.sessionId}"]`);
        if (tr) tr.replaceWith(row(s));
        if (before !== s.statusInfo.status) announce(`${s.name} is ${s.statusInfo.status}`);
      } else if (L.offset === 0) {
        clearTimeout(state.reloadTimer);
        state.reloadTimer = setTimeout(loadList, 200);
      }
    } else if (state.view === "detail" && state.detail && state.detail.s.sessionId === s.sessionId) {
      const was = state.detail.s.statusInfo.status;
      state.detail.s = s;
      const card = document.getElementById("live-card");
      if (card) card.replaceWith(liveCard(s));
      if (was !== s.statusInfo.status) {
        announce(`${s.name} is ${s.statusInfo.status}`);
        // A stop saves a checkpoint: show it.
        if (s.statusInfo.status === "stopped") loadDetail(s.sessionId).catch(() => {});
      }
    }
  });
  es.addEventListener("removed", (ev) => {
    const { sessionId } = JSON.parse(ev.data);
    if (state.view === "list" && state.list.rows.has(sessionId)) loadList();
  });
  es.onerror = () => {
    document.body.dataset.live = "reconnecting";
  };
}

// ------------------------------------------------------------------ routing

function show(node) {
  const main = document.getElementById("main");
  main.replaceChildren(node);
}

async function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  try {
    if (parts[0] === "studio" && parts[1]) {
      state.view = "detail";
      state.detail = null;
      await loadDetail(parts[1]);
    } else if (parts[0] === "new") {
      state.view = "form";
      show(await formView(parts[1] ? "clone" : "add", parts[1], parts[2]));
    } else if (parts[0] === "edit" && parts[1]) {
      state.view = "form";
      show(await formView("edit", parts[1]));
    } else {
      state.view = "list";
      show(listView());
      await loadList();
    }
  } catch (e) {
    show(h("section", {}, h("p", { class: "notice error", role: "alert" }, e.message), h("p", {}, h("a", { href: "#/" }, "All studios"))));
  }
  document.getElementById("main").focus({ preventScroll: true });
}

async function chooseWorkspace(id) {
  state.ws = id;
  const entry = state.workspaces.find((w) => w.workspaceId === id);
  state.role = (entry && entry.roles && entry.roles[0]) || "view";
  document.getElementById("role").textContent = `your role: ${state.role}`;
  document.body.dataset.role = state.role;
  localStorage.setItem("studios-workspace", String(id));
  state.list.offset = 0;
  await route();
  // After the first screen is drawn: the stream's setup does not delay it.
  connectEvents();
}

async function main() {
  const saved = Number(localStorage.getItem("studios-workspace"));
  // The page carries the workspaces (controller.web_console); the API is the fallback.
  const bootMeta = document.querySelector("meta[name=studios-boot]");
  const boot = bootMeta ? JSON.parse(bootMeta.content) : null;
  const [info, listing] = boot
    ? [boot, boot]
    : await Promise.all([api("GET", "/user-info"), api("GET", `/user/${state.user.id}/workspaces`)]);
  state.workspaces = (listing.orgsAndWorkspaces || []).filter((w) => w.workspaceId);
  const select = document.getElementById("workspace");
  select.replaceChildren(...state.workspaces.map((w) => h("option", { value: w.workspaceId }, `${w.orgName} / ${w.workspaceName}`)));
  const ids = state.workspaces.map((w) => w.workspaceId);
  const first = ids.includes(saved) ? saved : ids.includes(info.defaultWorkspaceId) ? info.defaultWorkspaceId : ids[0] ?? 1;
  select.value = String(first);
  select.addEventListener("change", () => chooseWorkspace(Number(select.value)));
  window.addEventListener("hashchange", route);
  await chooseWorkspace(first);
}

main().catch((e) => show(h("p", { class: "notice error", role: "alert" }, `The console could not load: ${e.message}`)));
