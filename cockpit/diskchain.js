/* SPDX-License-Identifier: LGPL-2.1-or-later */
/*
 * The diskchain page for Cockpit: chains, jobs, exports and backup plans of
 * diskchaind, through cockpit.dbus on the system bus only.
 *
 * Design notes
 * ------------
 * - Plain JavaScript with PatternFly's stylesheet (the pf-v5 classes Cockpit's
 *   own pages are drawn with), no framework and no bundler: the page is a few
 *   lists and dialogs over one D-Bus service, and what the browser runs is
 *   the file in this directory, readable as it is installed.
 * - State comes from ObjectManager proxies (client.proxies over the
 *   daemon's tree): InterfacesAdded/Removed and PropertiesChanged redraw
 *   what changed, the job signals (BlockJobError, BlockJobCompleted, ...)
 *   are shown in place, and nothing is polled.  A job's rate and expected
 *   end are the daemon's properties.  The allocation map of a layer is the
 *   one method call that reads data (Image.Map); it is asked again only when
 *   the layer's properties change.
 * - Every string from the bus reaches the page as text (DOM nodes, never
 *   markup): image paths are chosen by whoever can write the storage roots.
 * - Authorization is polkit's, through the daemon: an action the user may
 *   not take fails with AccessDenied or InteractiveAuthorizationRequired,
 *   and the page says so where the action was asked for, with the daemon's
 *   message naming the polkit action.
 */
"use strict";

const BUS = "org.diskchain.DiskChain1";
const ROOT = "/org/diskchain/DiskChain1";
const IF = name => BUS + "." + name;
const _ = s => (typeof cockpit.gettext === "function" ? cockpit.gettext(s) : s);

const client = cockpit.dbus(BUS, { bus: "system" });
const P = {
    Image: client.proxies(IF("Image"), ROOT),
    Chain: client.proxies(IF("Chain"), ROOT),
    Job: client.proxies(IF("Job"), ROOT),
    Export: client.proxies(IF("Export"), ROOT),
    Plan: client.proxies(IF("Plan"), ROOT),
};
/* (the manager is the ObjectManager itself, not one of its objects: called, not proxied) */
const managerCall = (method, args) => client.call(ROOT, IF("Manager"), method, args);

/* What the page remembers between redraws. */
const state = {
    tab: "chains",
    selected: {},        /* chain path -> image path whose map is shown */
    maps: {},            /* image path -> { key, extents | error, pending } */
    jobEvents: {},       /* job path -> the last job signal worth showing: { kind, text } */
    jobErrors: {},       /* job path -> the error of the last verb the user asked for */
    planErrors: {},      /* plan path -> the error of the last action */
    chainErrors: {},     /* chain path -> the error of the last action started from its card */
    finished: [],        /* jobs that ended while the page was open: { id, type, text, ok } */
    owner: undefined,
};

/* --- DOM helpers ---------------------------------------------------------------------------------- */

function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
        if (v === undefined || v === null || v === false)
            continue;
        if (k.startsWith("on"))
            el.addEventListener(k.slice(2), v);
        else if (k === "class")
            el.className = v;
        else if (k === "dataset")
            Object.assign(el.dataset, v);
        else if (k === "style")
            Object.assign(el.style, v); /* (through the CSSOM: Cockpit's policy refuses style attributes) */
        else
            el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) {
        if (c === undefined || c === null || c === false)
            continue;
        el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
}

function svg(tag, attrs, ...children) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {}))
        el.setAttribute(k, v);
    for (const c of children.flat())
        if (c)
            el.append(c);
    return el;
}

function button(label, onclick, variant, extra) {
    return h("button", Object.assign({ class: "pf-v5-c-button pf-m-" + (variant || "secondary") + " pf-m-small", type: "button", onclick }, extra || {}), label);
}

function label(text, color) {
    return h("span", { class: "pf-v5-c-label pf-m-compact" + (color ? " pf-m-" + color : "") },
             h("span", { class: "pf-v5-c-label__content" }, text));
}

function alert(variant, title, text, extra, onClose) {
    return h("div", Object.assign({ class: "pf-v5-c-alert pf-m-inline pf-m-" + variant, role: "alert" }, extra || {}),
             h("p", { class: "pf-v5-c-alert__title" }, title),
             onClose ? h("div", { class: "pf-v5-c-alert__action" },
                         h("button", { class: "pf-v5-c-button pf-m-plain", type: "button", "aria-label": _("Close"), onclick: onClose }, "\u2715")) : null,
             text ? h("div", { class: "pf-v5-c-alert__description" }, text) : null);
}

function bytes(n) {
    if (n === undefined || n === null)
        return "";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0;
    let v = Number(n);
    while (v >= 1024 && i < units.length - 1) {
        v /= 1024;
        i++;
    }
    return (i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
}

function parseSize(text) {
    const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$/i.exec(text || "");
    if (!m)
        return null;
    const mult = { "": 1, k: 1 << 10, m: 1 << 20, g: 1 << 30, t: 2 ** 40, p: 2 ** 50 }[m[2].toLowerCase()];
    return Math.round(parseFloat(m[1]) * mult);
}

function basename(p) {
    return (p || "").replace(/\/+$/, "").split("/").pop();
}

function when(us) {
    if (!us)
        return _("never");
    return new Date(Number(us) / 1000).toLocaleString();
}

function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60)
        return seconds + " s";
    if (seconds < 3600)
        return Math.floor(seconds / 60) + " min " + (seconds % 60) + " s";
    return Math.floor(seconds / 3600) + " h " + Math.floor((seconds % 3600) / 60) + " min";
}

/* The words for a failed call: polkit's refusals said as such, everything else with the daemon's message. */
function describeError(err) {
    const name = (err && (err.name || err.problem)) || "";
    const msg = (err && err.message) || String(err);
    if (/AccessDenied|InteractiveAuthorizationRequired|NotAuthorized|not-authorized|access-denied/.test(name + " " + msg))
        return { title: _("Not authorized"), text: msg + " — " + _("ask an administrator to allow this action, or use administrative access."), denied: true };
    return { title: name.replace(/^org\.diskchain\.DiskChain1\.Error\./, "").replace(/^org\.freedesktop\.DBus\.Error\./, "") || _("Failed"), text: msg };
}

/* --- redraws -------------------------------------------------------------------------------------- */

let redrawQueued = false;
function redraw() {
    if (redrawQueued)
        return;
    redrawQueued = true;
    window.requestAnimationFrame(() => {
        redrawQueued = false;
        renderHeader();
        if (state.reconnecting)
            return; /* (the last view stays while the daemon starts again) */
        const view = document.getElementById("view-" + state.tab);
        const fn = { chains: renderChains, jobs: renderJobs, exports: renderExports, plans: renderPlans }[state.tab];
        const content = [fn()].flat();
        /* (nodes already in place stay: the chains' toolbar keeps its focus) */
        if (content.length !== view.children.length || content.some((c, i) => view.children[i] !== c))
            view.replaceChildren(...content);
        document.body.dataset.ready = "1";
    });
}

function valid(proxies) {
    return Object.values(proxies).filter(p => p && p.valid);
}

function imageByPath(path) {
    return valid(P.Image).find(i => i.Path === path);
}

function renderHeader() {
    const jobs = valid(P.Job);
    document.getElementById("job-count").textContent = String(jobs.length);
    const st = document.getElementById("service-state");
    if (state.reconnecting || state.owner === null)
        st.textContent = _("diskchaind stopped while idle; starting it again…");
    else if (state.manager)
        st.textContent = cockpit.format(_("diskchaind $0 — storage roots: $1"), state.manager.Version,
                                        state.manager.StorageRoots.join(", "));
}

/* Job notices that outlive the job: a finished job's outcome, shown above every view. */
function renderNotices() {
    const box = document.getElementById("notices");
    box.replaceChildren(...state.finished.slice(-3).map(f =>
        alert(f.ok ? "success" : f.cancelled ? "info" : "danger", f.text, null, { "data-notice": f.id },
              () => { state.finished.splice(state.finished.indexOf(f), 1); renderNotices() })));
    box.hidden = state.finished.length === 0;
}

/* --- chains --------------------------------------------------------------------------------------- */

const DEPTH_COLORS = ["#0066cc", "#3e8635", "#8476d1", "#f0ab00", "#009596", "#c9190b", "#6a6e73", "#a18fff"];

function layerColor(depth) {
    return DEPTH_COLORS[depth % DEPTH_COLORS.length];
}

/* The allocation map of the chain topped by IMAGE: asked for when its properties change, drawn by depth. */
function mapOf(image) {
    const key = [image.ActualSize, image.VirtualSize, image.Dirty, (image.Overlays || []).length].join(":");
    let m = state.maps[image.Path];
    if (m && m.key === key)
        return m;
    m = state.maps[image.Path] = { key, pending: true };
    const extents = [];
    const ask = offset => image.call("Map", [offset, 0, { "max-extents": cockpit.variant("u", 4096) }])
            .then(([reply]) => {
                extents.push(...reply);
                const last = reply[reply.length - 1];
                const end = last ? last[0] + last[1] : image.VirtualSize;
                if (reply.length === 4096 && end < image.VirtualSize)
                    return ask(end);
                m.extents = extents;
            });
    ask(0).catch(err => { m.error = describeError(err) })
            .finally(() => { m.pending = false; if (state.maps[image.Path] === m) redraw() });
    return m;
}

/* A layer's colour: by its place from the base, the same in its box and in every map. */
function colorOf(layers, path) {
    const i = layers.findIndex(l => l && l.Path === path);
    return layerColor(i < 0 ? 0 : layers.length - 1 - i);
}

function renderMap(image, layers) {
    const m = mapOf(image);
    const box = h("div", { class: "dc-map", "data-map": image.Path });
    box.append(h("div", { class: "dc-map__title" }, cockpit.format(_("Allocation of the chain seen from $0"), basename(image.Path))));
    if (m.error) {
        box.append(alert(m.error.denied ? "warning" : "danger", m.error.title, m.error.text));
        return box;
    }
    if (!m.extents) {
        box.append(h("div", { class: "dc-map__bar dc-map__bar--loading" }, _("Reading the map…")));
        return box;
    }
    const size = image.VirtualSize || 1;
    const W = 1000;
    const top = Math.max(0, layers.findIndex(l => l && l.Path === image.Path)); /* depth 0: this layer */
    const bar = svg("svg", { class: "dc-map__bar", viewBox: `0 0 ${W} 24`, preserveAspectRatio: "none", role: "img" });
    const title = [];
    const totals = { data: 0, zero: 0, unallocated: 0 };
    /* merged runs of one kind: fewer rectangles, same picture */
    let run = null;
    const flush = () => {
        if (!run)
            return;
        const x = run.start / size * W;
        const w = Math.max(run.length / size * W, 0.5);
        const owner = layers[top + run.depth];
        const fill = run.kind === "data" ? (owner ? colorOf(layers, owner.Path) : layerColor(run.depth))
            : run.kind === "zero" ? "url(#dc-zero)" : "transparent";
        bar.append(svg("rect", { x, y: 0, width: w, height: 24, fill, class: "dc-map__" + run.kind, "data-depth": run.depth }));
        run = null;
    };
    for (const [start, length, depth, present, zero, data] of m.extents) {
        const kind = !present ? "unallocated" : zero && !data ? "zero" : "data";
        totals[kind] += length;
        if (run && run.kind === kind && run.depth === depth && run.start + run.length === start) {
            run.length += length;
            continue;
        }
        flush();
        run = { start, length, depth, kind };
    }
    flush();
    bar.prepend(svg("defs", {}, svg("pattern", { id: "dc-zero", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" },
                                     svg("rect", { width: 6, height: 6, fill: "#f0f0f0" }),
                                     svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#8a8d90", "stroke-width": 2 }))));
    box.append(bar);
    const legend = h("div", { class: "dc-map__legend" });
    for (const l of layers.slice(top))
        if (l)
            legend.append(h("span", { class: "dc-map__key" }, h("span", { class: "dc-swatch", style: { background: colorOf(layers, l.Path) } }), cockpit.format(_("data in $0"), basename(l.Path))));
    legend.append(h("span", { class: "dc-map__key" }, h("span", { class: "dc-swatch dc-swatch--zero" }), cockpit.format(_("zero ($0)"), bytes(totals.zero))));
    legend.append(h("span", { class: "dc-map__key" }, h("span", { class: "dc-swatch dc-swatch--none" }), cockpit.format(_("unallocated ($0)"), bytes(totals.unallocated))));
    legend.append(h("span", { class: "dc-map__key" }, cockpit.format(_("$0 of data"), bytes(totals.data))));
    box.append(legend);
    title.push(m.extents.length + " extents");
    bar.setAttribute("aria-label", title.join(", "));
    return box;
}

function renderLayer(image, color, chainPath, isActive) {
    const selected = (state.selected[chainPath] || null) === image.Path;
    const inUse = image.InUse ? label(image.InUse, "orange") : null;
    return h("div", {
        class: "dc-layer" + (selected ? " dc-layer--selected" : "") + (isActive ? " dc-layer--active" : ""),
        "data-layer": image.Path, role: "button", tabindex: 0,
        title: image.Path,
        onclick: () => { state.selected[chainPath] = selected ? null : image.Path; redraw() },
    },
    h("span", { class: "dc-layer__bar", style: { background: color } }),
    h("div", { class: "dc-layer__name" }, basename(image.Path)),
    h("div", { class: "dc-layer__meta" }, image.Format, " · ", bytes(image.VirtualSize)),
    h("div", { class: "dc-layer__meta" }, cockpit.format(_("$0 allocated"), bytes(image.ActualSize))),
    h("div", { class: "dc-layer__labels" },
      isActive ? label(_("active"), "blue") : null, inUse,
      image.Corrupt ? label(_("corrupt"), "red") : null,
      image.Dirty ? label(_("dirty"), "orange") : null,
      (image.Bitmaps || []).length ? label(image.Bitmaps.length === 1 ? _("1 bitmap") : cockpit.format(_("$0 bitmaps"), image.Bitmaps.length), "purple") : null));
}

function renderChain(chain) {
    const layerPaths = chain.Layers || [];
    const layers = layerPaths.map(p => P.Image[p]).filter(Boolean);
    const active = P.Image[chain.Active];
    if (!active)
        return null;
    /* drawn base to active, as the seed draws them: [A] <-- [B] <-- [C] */
    const row = h("div", { class: "dc-chain__layers" });
    const baseFirst = layers.slice().reverse();
    baseFirst.forEach((img, i) => {
        if (i > 0)
            row.append(h("span", { class: "dc-arrow", "aria-hidden": "true" }, "\u2190\u2500\u2500"));
        row.append(renderLayer(img, colorOf(layers, img.Path), chain.path, img.Path === active.Path));
    });
    const selectedPath = state.selected[chain.path];
    const shown = (selectedPath && imageByPath(selectedPath)) || active;
    const jobs = (chain.Jobs || []).map(j => P.Job[j]).filter(Boolean);
    const exps = (chain.Exports || []).map(e => P.Export[e]).filter(Boolean);
    const err = state.chainErrors[chain.path];
    const actions = h("div", { class: "dc-actions" },
                      button(_("Snapshot"), () => dialogSnapshot(chain, active), "secondary", { "data-action": "snapshot" }),
                      button(_("Stream"), () => dialogStream(chain, layers), "secondary", { "data-action": "stream", disabled: layers.length < 2 }),
                      button(_("Commit"), () => dialogCommit(chain, layers), "secondary", { "data-action": "commit", disabled: layers.length < 2 }),
                      button(_("Mirror"), () => dialogMirror(chain, active), "secondary", { "data-action": "mirror" }),
                      button(_("Back up"), () => dialogBackup(chain, active), "primary", { "data-action": "backup" }),
                      button(_("Export"), () => dialogExport(chain, active), "secondary", { "data-action": "export" }));
    const imageActions = h("div", { class: "dc-actions dc-actions--image" },
                           h("span", { class: "dc-actions__label" }, basename(shown.Path) + ":"),
                           button(_("Check"), () => dialogCheck(shown), "link", { "data-action": "check" }),
                           button(_("Bitmaps"), () => dialogBitmaps(shown), "link", { "data-action": "bitmaps" }),
                           button(_("Resize"), () => dialogResize(shown), "link", { "data-action": "resize" }),
                           button(_("Delete"), () => dialogDelete(shown), "link", { "data-action": "delete" }));
    return h("article", { class: "pf-v5-c-card dc-chain", "data-chain": active.Path },
             h("div", { class: "pf-v5-c-card__header" },
               h("div", { class: "pf-v5-c-card__title" },
                 h("h2", { class: "pf-v5-c-title pf-m-lg" }, basename(active.Path)),
                 h("span", { class: "dc-muted" }, cockpit.format(layers.length === 1 ? _("1 layer, $1") : _("$0 layers, $1"), layers.length, bytes(chain.VirtualSize))),
                 jobs.length ? label(jobs.length === 1 ? _("1 job") : cockpit.format(_("$0 jobs"), jobs.length), "blue") : null,
                 exps.map(e => label(cockpit.format(_("exported as $0"), e.Name), "green")))),
             h("div", { class: "pf-v5-c-card__body" },
               row,
               renderMap(shown, layers),
               err ? alert(err.denied ? "warning" : "danger", err.title, err.text, { "data-error": "chain" }) : null,
               actions, imageActions));
}

/*
 * Ten thousand images make thousands of chains: the page draws the first
 * CHAIN_PAGE that match the filter (more on request), and only drawn cards
 * ask for an allocation map.  The toolbar is made once, so that typing in
 * the filter keeps its focus across redraws.
 */
const CHAIN_PAGE = 25;
const chainsToolbar = h("div", { class: "dc-toolbar" },
                        button(_("Create image"), () => dialogCreate(), "primary", { "data-action": "create-image" }),
                        h("input", { class: "pf-v5-c-form-control dc-filter", type: "search", "aria-label": _("Filter chains"),
                                     placeholder: _("Filter by name"), "data-filter": "chains",
                                     oninput: ev => { state.filter = ev.target.value.trim(); state.limit = CHAIN_PAGE; redraw() } }));
const chainsList = h("div", { class: "dc-chains" });

function renderChains() {
    const all = valid(P.Chain).filter(c => P.Image[c.Active]).sort((a, b) => (a.path < b.path ? -1 : 1));
    const filter = (state.filter || "").toLowerCase();
    const chains = filter ? all.filter(c => (chainLayers(c)).some(i => basename(i.Path).toLowerCase().includes(filter))) : all;
    const limit = state.limit || CHAIN_PAGE;
    let content;
    if (!all.length)
        content = h("div", { class: "pf-v5-c-empty-state" },
                    h("div", { class: "pf-v5-c-empty-state__content" },
                      h("h2", { class: "pf-v5-c-title pf-m-lg" }, _("No images in the storage roots")),
                      h("div", { class: "pf-v5-c-empty-state__body" }, _("Create one, or copy qcow2 or raw images into a storage root."))));
    else
        content = [chains.slice(0, limit).map(renderChain),
            chains.length > limit
                ? button(cockpit.format(_("Show $0 more ($1 not shown)"), Math.min(CHAIN_PAGE, chains.length - limit), chains.length - limit),
                         () => { state.limit = limit + CHAIN_PAGE; redraw() }, "link", { "data-action": "more-chains" })
                : null,
            !chains.length ? h("p", { class: "dc-muted" }, cockpit.format(_("No chain has a layer named like '$0'."), state.filter)) : null];
    chainsList.replaceChildren(...[content].flat(Infinity).filter(Boolean));
    return [chainsToolbar, chainsList];
}

function chainLayers(chain) {
    return (chain.Layers || []).map(p => P.Image[p]).filter(Boolean);
}

/* --- jobs ----------------------------------------------------------------------------------------- */

/* QEMU's verb table: which verbs a status allows. */
const VERBS = {
    created: ["cancel"],
    running: ["pause", "speed", "cancel"],
    paused: ["resume", "speed", "cancel"],
    ready: ["complete", "pause", "speed", "cancel"],
    standby: ["resume", "speed", "cancel"],
    waiting: ["cancel"],
    pending: ["finalize", "cancel"],
    aborting: [],
    concluded: ["dismiss"],
    null: [],
};

function jobVerb(job, verb) {
    const call = {
        pause: () => job.call("Pause", []),
        resume: () => job.call("Resume", []),
        cancel: () => job.call("Cancel", [false]),
        complete: () => job.call("Complete", []),
        finalize: () => job.call("Finalize", []),
        dismiss: () => job.call("Dismiss", []),
        blocking: () => job.call("Change", [{ "copy-mode": cockpit.variant("s", "write-blocking") }]),
    }[verb];
    delete state.jobErrors[job.path];
    call().catch(err => { state.jobErrors[job.path] = describeError(err); redraw() });
}

function renderJob(job) {
    const pct = job.TotalProgress ? Math.min(100, Math.floor(job.CurrentProgress * 100 / job.TotalProgress)) : 0;
    const now = Date.now() * 1000;
    const eta = job.ExpectedEndTime && job.Status === "running" ? duration((job.ExpectedEndTime - now) / 1e6) : null;
    const verbs = (VERBS[job.Status] || []).filter(v => v !== "complete" || job.Ready);
    /* block-job-change: a mirror's copy mode goes from background to write-blocking (not back) */
    if (job.Type === "mirror" && !job.ActivelySynced && ["running", "ready"].includes(job.Status))
        verbs.push("blocking");
    const names = { pause: _("Pause"), resume: _("Resume"), cancel: _("Cancel"), complete: _("Complete"), finalize: _("Finalize"), dismiss: _("Dismiss"), speed: _("Set speed"), blocking: _("Write-blocking") };
    if (job.Type === "mirror" && job.Status === "ready")
        names.cancel = _("Stop, keep the copy"); /* QEMU's cancel of a ready mirror: a point-in-time copy */
    const ev = state.jobEvents[job.path];
    const err = state.jobErrors[job.path];
    const statusColor = { running: "blue", ready: "green", paused: "orange", standby: "orange", concluded: "grey", pending: "purple", aborting: "red" }[job.Status];
    const detail = [];
    if (job.Rate)
        detail.push(cockpit.format(_("$0/s"), bytes(job.Rate)));
    if (eta)
        detail.push(cockpit.format(_("$0 left"), eta));
    if (job.Speed)
        detail.push(cockpit.format(_("limited to $0/s"), bytes(job.Speed)));
    if (job.Type === "mirror" && job.Status === "ready")
        detail.push(job.ActivelySynced ? _("in sync (write-blocking)") : _("in sync"));
    return h("tr", { class: "pf-v5-c-table__tr", "data-job": job.Id, "data-status": job.Status },
             h("td", { class: "pf-v5-c-table__td", "data-label": "Job" }, h("strong", {}, job.Id), h("div", { class: "dc-muted" }, job.Type)),
             h("td", { class: "pf-v5-c-table__td", "data-label": "Status" }, label(job.Status, statusColor), job.IoStatus && job.IoStatus !== "ok" ? label(job.IoStatus, "red") : null),
             h("td", { class: "pf-v5-c-table__td dc-progress-cell", "data-label": "Progress" },
               h("div", { class: "pf-v5-c-progress pf-m-sm" + (job.Error ? " pf-m-danger" : pct === 100 ? " pf-m-success" : ""), "data-progress": pct },
                 h("div", { class: "pf-v5-c-progress__description" }, cockpit.format(_("$0 of $1"), bytes(job.CurrentProgress), bytes(job.TotalProgress))),
                 h("div", { class: "pf-v5-c-progress__status" }, h("span", { class: "pf-v5-c-progress__measure" }, pct + "%")),
                 h("div", { class: "pf-v5-c-progress__bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct },
                   h("div", { class: "pf-v5-c-progress__indicator", style: { width: pct + "%" } }))),
               h("div", { class: "dc-muted" }, detail.join(" · "))),
             h("td", { class: "pf-v5-c-table__td", "data-label": "Images" }, h("div", { title: job.Top }, basename(job.Top)), job.Target && job.Target !== job.Top ? h("div", { class: "dc-muted", title: job.Target }, "\u2192 " + (job.Target.includes("://") ? job.Target : basename(job.Target))) : null),
             h("td", { class: "pf-v5-c-table__td dc-verbs" },
               verbs.map(v => button(names[v], () => (v === "speed" ? dialogSpeed(job) : jobVerb(job, v)), v === "complete" || v === "finalize" ? "primary" : v === "cancel" ? "danger" : "secondary", { "data-verb": v })),
               job.Error ? alert("danger", _("The job failed"), job.Error, { "data-error": "job" }) : null,
               ev ? alert(ev.variant, ev.title, ev.text, { "data-event": ev.kind }) : null,
               err ? alert(err.denied ? "warning" : "danger", err.title, err.text, { "data-error": "verb" }) : null));
}

function renderJobs() {
    const jobs = valid(P.Job).sort((a, b) => (a.StartTime || 0) - (b.StartTime || 0));
    if (!jobs.length)
        return h("div", { class: "pf-v5-c-empty-state" },
                 h("div", { class: "pf-v5-c-empty-state__content" },
                   h("h2", { class: "pf-v5-c-title pf-m-lg" }, _("No block jobs")),
                   h("div", { class: "pf-v5-c-empty-state__body" }, _("Stream, commit, mirror and backup jobs appear here while they run."))));
    return h("table", { class: "pf-v5-c-table pf-m-compact pf-m-grid-md", role: "grid", "aria-label": "Jobs" },
             h("thead", { class: "pf-v5-c-table__thead" },
               h("tr", { class: "pf-v5-c-table__tr" }, ["Job", "Status", "Progress", "Images", ""].map(t => h("th", { class: "pf-v5-c-table__th" }, t)))),
             h("tbody", { class: "pf-v5-c-table__tbody" }, jobs.map(renderJob)));
}

/* --- exports -------------------------------------------------------------------------------------- */

function renderExports() {
    const exps = valid(P.Export).sort((a, b) => (a.Name < b.Name ? -1 : 1));
    if (!exps.length)
        return h("div", { class: "pf-v5-c-empty-state" },
                 h("div", { class: "pf-v5-c-empty-state__content" },
                   h("h2", { class: "pf-v5-c-title pf-m-lg" }, _("No NBD exports")),
                   h("div", { class: "pf-v5-c-empty-state__body" }, _("Export a chain from its card to serve it over NBD."))));
    return h("table", { class: "pf-v5-c-table pf-m-compact pf-m-grid-md", role: "grid", "aria-label": "Exports" },
             h("thead", { class: "pf-v5-c-table__thead" },
               h("tr", { class: "pf-v5-c-table__tr" }, ["Name", "URI", "Access", "Clients", "Read / written", ""].map(t => h("th", { class: "pf-v5-c-table__th" }, t)))),
             h("tbody", { class: "pf-v5-c-table__tbody" }, exps.map(e => {
                 const chain = P.Chain[e.Chain];
                 const err = state.chainErrors[e.path];
                 return h("tr", { class: "pf-v5-c-table__tr", "data-export": e.Name },
                          h("td", { class: "pf-v5-c-table__td" }, h("strong", {}, e.Name), chain && P.Image[chain.Active] ? h("div", { class: "dc-muted" }, basename(P.Image[chain.Active].Path)) : null),
                          h("td", { class: "pf-v5-c-table__td" }, h("code", { class: "dc-uri" }, e.Uri)),
                          h("td", { class: "pf-v5-c-table__td" }, e.Writable ? label(_("read-write"), "orange") : label(_("read-only")), e.Snapshot ? label(_("point in time"), "purple") : null),
                          h("td", { class: "pf-v5-c-table__td" }, String(e.Clients)),
                          h("td", { class: "pf-v5-c-table__td" }, bytes(e.BytesRead) + " / " + bytes(e.BytesWritten)),
                          h("td", { class: "pf-v5-c-table__td" }, button(_("Stop"), () => {
                              delete state.chainErrors[e.path];
                              e.call("Stop", []).catch(err => { state.chainErrors[e.path] = describeError(err); redraw() });
                          }, "secondary", { "data-action": "unexport" }),
                          err ? alert(err.denied ? "warning" : "danger", err.title, err.text) : null));
             })));
}

/* --- plans ---------------------------------------------------------------------------------------- */

function planAction(plan, method, args) {
    delete state.planErrors[plan.path];
    redraw();
    return plan.call(method, args).then(reply => { redraw(); return reply })
            .catch(err => { state.planErrors[plan.path] = describeError(err); redraw() });
}

function renderPlan(plan) {
    const err = state.planErrors[plan.path];
    const points = plan.RestorePoints || [];
    const retention = Object.entries(plan.Retention || {}).filter(([, v]) => v).map(([k, v]) => k + " " + v).join(", ") || _("keep everything");
    const job = plan.Job && plan.Job !== "/" ? P.Job[plan.Job] : null;
    return h("article", { class: "pf-v5-c-card dc-plan", "data-plan": plan.Name },
             h("div", { class: "pf-v5-c-card__header" },
               h("div", { class: "pf-v5-c-card__title" },
                 h("h2", { class: "pf-v5-c-title pf-m-lg" }, plan.Name),
                 plan.Running ? label(job ? cockpit.format(_("running: $0"), job.Id) : _("busy"), "blue") : null)),
             h("div", { class: "pf-v5-c-card__body" },
               h("dl", { class: "pf-v5-c-description-list pf-m-horizontal pf-m-compact" },
                 [[_("Chain"), plan.Chain], [_("Destination"), plan.Destination], [_("Schedule"), plan.Schedule],
                  [_("Level"), plan.Level + (plan.Level === "auto" ? cockpit.format(_(" (full every $0 runs)"), plan.FullEvery) : "")],
                  [_("Retention"), retention], [_("Last run"), when(plan.LastRun)], [_("Result"), plan.LastResult || "—"],
                  [_("Next run"), plan.NextRun ? when(plan.NextRun) : _("not scheduled")]].map(([k, v]) =>
                     h("div", { class: "pf-v5-c-description-list__group" },
                       h("dt", { class: "pf-v5-c-description-list__term" }, h("span", { class: "pf-v5-c-description-list__text" }, k)),
                       h("dd", { class: "pf-v5-c-description-list__description" }, h("div", { class: "pf-v5-c-description-list__text" }, v))))),
               err ? alert(err.denied ? "warning" : "danger", err.title, err.text, { "data-error": "plan" }) : null,
               h("div", { class: "dc-actions" },
                 button(_("Run now"), () => planAction(plan, "Run", []), "primary", { "data-action": "plan-run", disabled: plan.Running }),
                 button(_("Verify"), () => planAction(plan, "Verify", [{}]).then(r => {
                     if (r)
                         state.planErrors[plan.path] = { title: _("Verified"), text: r[0].map(x => x[0] + ": " + x[2]).join("; "), ok: true };
                     redraw();
                 }), "secondary", { "data-action": "plan-verify", disabled: plan.Running }),
                 button(_("Prune"), () => planAction(plan, "Prune", [{}]), "secondary", { "data-action": "plan-prune", disabled: plan.Running }),
                 button(_("Edit"), () => dialogEditPlan(plan), "link", { "data-action": "plan-edit" }),
                 button(_("Delete"), () => dialog(cockpit.format(_("Delete plan $0?"), plan.Name), [], _("Delete"),
                                                  () => plan.call("Delete", []), _("The plan and its catalog go; the backup files stay, as ordinary images.")),
                        "link", { "data-action": "plan-delete", disabled: plan.Running })),
               pointsTable(plan, points)));
}

function pointsTable(plan, points) {
    const rows = points.slice().reverse().map(([id, time, level, file, size, st]) =>
        h("tr", { class: "pf-v5-c-table__tr", "data-point": id },
          h("td", { class: "pf-v5-c-table__td", title: file }, id),
          h("td", { class: "pf-v5-c-table__td" }, when(time)),
          h("td", { class: "pf-v5-c-table__td" }, level),
          h("td", { class: "pf-v5-c-table__td" }, bytes(size)),
          h("td", { class: "pf-v5-c-table__td" }, label(st, st === "verified" ? "green" : st === "damaged" ? "red" : null)),
          h("td", { class: "pf-v5-c-table__td" }, button(_("Restore"), () => dialogRestore(plan, id), "link", { "data-action": "plan-restore" }))));
    if (!rows.length)
        rows.push(h("tr", { class: "pf-v5-c-table__tr" }, h("td", { class: "pf-v5-c-table__td", colspan: 6 }, _("No restore points yet."))));
    return h("table", { class: "pf-v5-c-table pf-m-compact", "aria-label": "Restore points" },
             h("thead", { class: "pf-v5-c-table__thead" },
               h("tr", { class: "pf-v5-c-table__tr" }, ["Point", "Time", "Level", "Size", "State", ""].map(t => h("th", { class: "pf-v5-c-table__th" }, t)))),
             h("tbody", { class: "pf-v5-c-table__tbody" }, rows));
}

function renderPlans() {
    const plans = valid(P.Plan).sort((a, b) => (a.Name < b.Name ? -1 : 1));
    const toolbar = h("div", { class: "dc-toolbar" }, button(_("Create plan"), dialogCreatePlan, "primary", { "data-action": "create-plan" }));
    if (!plans.length)
        return h("div", {}, toolbar, h("div", { class: "pf-v5-c-empty-state" },
                                       h("div", { class: "pf-v5-c-empty-state__content" },
                                         h("h2", { class: "pf-v5-c-title pf-m-lg" }, _("No backup plans")),
                                         h("div", { class: "pf-v5-c-empty-state__body" }, _("A plan backs a chain up on a schedule, keeps restore points and restores them.")))));
    return h("div", { class: "dc-plans" }, toolbar, plans.map(renderPlan));
}

/* --- dialogs -------------------------------------------------------------------------------------- */

/*
 * A modal with FIELDS ({ id, label, type: text|number|select|check, value, options, help, show(values) }),
 * whose primary button runs SUBMIT(values) (a promise); its failure is shown in the dialog, its success
 * closes it.
 */
function dialog(title, fields, submitLabel, submit, intro) {
    const host = document.getElementById("dialogs");
    const inputs = {};
    const errBox = h("div", { class: "dc-dialog-error" });
    const values = () => {
        const v = {};
        for (const f of fields)
            v[f.id] = f.type === "check" ? inputs[f.id].checked : inputs[f.id].value.trim();
        return v;
    };
    const groups = fields.map(f => {
        const id = "dc-field-" + f.id;
        let input;
        if (f.type === "select")
            input = h("select", { class: "pf-v5-c-form-control", id, name: f.id },
                      f.options.map(o => h("option", { value: o[0], selected: o[0] === f.value }, o[1])));
        else if (f.type === "check")
            input = h("input", { class: "pf-v5-c-check__input", type: "checkbox", id, name: f.id, checked: !!f.value });
        else
            input = h("input", { class: "pf-v5-c-form-control", type: "text", id, name: f.id, value: f.value || "", placeholder: f.placeholder });
        inputs[f.id] = input;
        input.addEventListener("change", () => refresh());
        const group = f.type === "check"
            ? h("div", { class: "pf-v5-c-form__group", "data-field": f.id }, h("div", { class: "pf-v5-c-check" }, input, h("label", { class: "pf-v5-c-check__label", for: id }, f.label)))
            : h("div", { class: "pf-v5-c-form__group", "data-field": f.id },
                h("div", { class: "pf-v5-c-form__group-label" }, h("label", { class: "pf-v5-c-form__label", for: id }, h("span", { class: "pf-v5-c-form__label-text" }, f.label))),
                h("div", { class: "pf-v5-c-form__group-control" }, f.type === "select" ? h("span", { class: "pf-v5-c-form-control" }, input) : input,
                  f.help ? h("div", { class: "pf-v5-c-form__helper-text" }, f.help) : null));
        f.group = group;
        return group;
    });
    const refresh = () => {
        const v = values();
        for (const f of fields)
            f.group.hidden = f.show ? !f.show(v) : false;
    };
    const close = () => { host.replaceChildren(); document.removeEventListener("keydown", onKey) };
    const onKey = ev => { if (ev.key === "Escape") close() };
    const primary = h("button", { class: "pf-v5-c-button pf-m-primary", type: "submit", "data-dialog-submit": "1" }, submitLabel);
    const form = h("form", { class: "pf-v5-c-form", novalidate: true, onsubmit: ev => {
        ev.preventDefault();
        errBox.replaceChildren();
        primary.disabled = true;
        primary.classList.add("pf-m-progress", "pf-m-in-progress");
        Promise.resolve().then(() => submit(values())).then(close).catch(err => {
            const d = err && err.title ? err : describeError(err);
            errBox.replaceChildren(alert(d.ok ? "success" : d.denied ? "warning" : "danger", d.title, d.text,
                                         { "data-error": d.ok ? undefined : "dialog", "data-result": d.ok ? "1" : undefined }));
            primary.disabled = false;
            primary.classList.remove("pf-m-progress", "pf-m-in-progress");
        });
    } }, intro ? h("div", { class: "dc-dialog-intro" }, intro) : null, groups, errBox,
    h("footer", { class: "pf-v5-c-modal-box__footer" }, primary, h("button", { class: "pf-v5-c-button pf-m-link", type: "button", onclick: close }, _("Cancel"))));
    host.replaceChildren(h("div", { class: "pf-v5-c-backdrop" },
                           h("div", { class: "pf-v5-l-bullseye" },
                             h("div", { class: "pf-v5-c-modal-box pf-m-md", role: "dialog", "aria-modal": "true", "aria-label": title, "data-dialog": title },
                               h("header", { class: "pf-v5-c-modal-box__header" }, h("h1", { class: "pf-v5-c-modal-box__title" }, title)),
                               h("div", { class: "pf-v5-c-modal-box__body" }, form)))));
    document.addEventListener("keydown", onKey);
    refresh();
    const first = fields.find(f => f.type !== "check");
    if (first)
        inputs[first.id].focus();
}

function fail(title, text) {
    return Promise.reject({ title, text });
}

/* a{sv} from plain values: strings as s, booleans as b, numbers as the given type. */
function opts(spec) {
    const out = {};
    for (const [k, [type, v]] of Object.entries(spec))
        if (v !== undefined && v !== null && v !== "")
            out[k] = cockpit.variant(type, v);
    return out;
}

function speedOpt(text) {
    if (!text)
        return undefined;
    const n = parseSize(text);
    if (n === null)
        throw { title: _("Invalid speed"), text: cockpit.format(_("'$0' is no size (like 50M, meaning 50 MiB/s)"), text) };
    return n;
}

function startJob(chain, method, args) {
    return chain.call(method, args).then(([job]) => {
        state.tab = "jobs";
        showTab();
        return job;
    });
}

function stem(path) {
    return basename(path).replace(/\.[^.]*$/, "");
}

function dialogSnapshot(chain, active) {
    dialog(_("Take a snapshot"), [
        { id: "overlay", label: _("New active layer"), value: stem(active.Path) + "-snap.qcow2", help: _("A qcow2 overlay of the current active layer, which becomes read-only.") },
    ], _("Snapshot"), v => chain.call("Snapshot", [v.overlay, {}]));
}

function layerOptions(layers) {
    return layers.map(l => [l.Path, basename(l.Path)]);
}

function dialogStream(chain, layers) {
    dialog(_("Stream into a layer"), [
        { id: "top", label: _("Into"), type: "select", value: layers[0].Path, options: layerOptions(layers.slice(0, -1)) },
        { id: "base", label: _("Keep as backing file"), type: "select", value: "", options: [["", _("nothing (flatten)")]].concat(layerOptions(layers.slice(1))) },
        { id: "speed", label: _("Speed limit"), placeholder: _("none, or e.g. 100M (per second)") },
    ], _("Stream"), v => startJob(chain, "Stream", [opts({ top: ["s", v.top], base: ["s", v.base], speed: ["t", speedOpt(v.speed)] })]),
    _("Copies the data of the layers below into the chosen layer, so that they are no longer needed by it."));
}

function dialogCommit(chain, layers) {
    dialog(_("Commit layers"), [
        { id: "top", label: _("Top"), type: "select", value: layers[0].Path, options: layerOptions(layers.slice(0, -1)), help: _("The active layer: an active commit, completed by you once in sync.") },
        { id: "base", label: _("Into base"), type: "select", value: layers[layers.length - 1].Path, options: layerOptions(layers.slice(1)) },
        { id: "speed", label: _("Speed limit"), placeholder: _("none, or e.g. 100M") },
    ], _("Commit"), v => startJob(chain, "Commit", [opts({ top: ["s", v.top], base: ["s", v.base], speed: ["t", speedOpt(v.speed)] })]));
}

function dialogMirror(chain, active) {
    dialog(_("Mirror the chain"), [
        { id: "target", label: _("Target"), value: stem(active.Path) + "-mirror.qcow2", help: _("A new image in the storage roots, or an NBD URI (nbd://host/export)") },
        { id: "sync", label: _("Copy"), type: "select", value: "full", options: [["full", _("the whole chain")], ["top", _("the active layer only")], ["none", _("new writes only")]] },
        { id: "copymode", label: _("Write-blocking (guest writes wait for the target)"), type: "check" },
        { id: "speed", label: _("Speed limit"), placeholder: _("none, or e.g. 100M") },
    ], _("Mirror"), v => startJob(chain, "Mirror", [v.target, opts({ sync: ["s", v.sync], "copy-mode": ["s", v.copymode ? "write-blocking" : ""], speed: ["t", speedOpt(v.speed)] })]),
    _("Once in sync, complete the job to switch the chain to the copy, or cancel it to keep a copy of that moment."));
}

function dialogBackup(chain, active) {
    const bitmaps = (active.Bitmaps || []).map(b => [b[0], b[0]]);
    const today = new Date().toISOString().slice(0, 10);
    dialog(_("Back up the chain"), [
        { id: "target", label: _("Target"), value: stem(active.Path) + "-backup-" + today + ".qcow2", help: _("A new image in the storage roots, or an NBD URI") },
        { id: "sync", label: _("Level"), type: "select", value: "full", options: [["full", _("full")], ["incremental", _("incremental (from a bitmap)")], ["top", _("active layer only")]] },
        { id: "bitmap", label: _("Bitmap"), type: bitmaps.length ? "select" : "text", value: bitmaps.length ? bitmaps[0][0] : "", options: bitmaps, show: v => v.sync === "incremental" },
        { id: "checkpoint", label: _("Start a bitmap for the next incremental"), placeholder: _("bitmap name (optional)"), show: v => v.sync === "full" && active.Format === "qcow2" },
        { id: "compress", label: _("Compress"), type: "check" },
        { id: "speed", label: _("Speed limit"), placeholder: _("none, or e.g. 100M") },
    ], _("Back up"), v => startJob(chain, "Backup", [v.target, opts({
        sync: ["s", v.sync], bitmap: ["s", v.sync === "incremental" ? v.bitmap : ""], checkpoint: ["s", v.sync === "full" ? v.checkpoint : ""],
        compress: ["b", v.compress || undefined], speed: ["t", speedOpt(v.speed)],
    })]));
}

function dialogExport(chain, active) {
    dialog(_("Export over NBD"), [
        { id: "name", label: _("Export name"), value: stem(active.Path) },
        { id: "writable", label: _("Writable"), type: "check" },
        { id: "persistent", label: _("Keep serving when the last client leaves"), type: "check", value: true },
    ], _("Export"), v => chain.call("Export", [opts({ name: ["s", v.name], writable: ["b", v.writable], persistent: ["b", v.persistent] })])
            .then(() => { state.tab = "exports"; showTab() }));
}

function dialogCreate() {
    dialog(_("Create an image"), [
        { id: "path", label: _("Path"), value: "new.qcow2", help: _("Relative to the first storage root, or absolute inside a root") },
        { id: "size", label: _("Size"), value: "10G" },
        { id: "format", label: _("Format"), type: "select", value: "qcow2", options: [["qcow2", "qcow2"], ["raw", "raw"]] },
        { id: "backing", label: _("Backing file (optional)"), show: v => v.format === "qcow2" },
    ], _("Create"), v => {
        const size = parseSize(v.size);
        if (size === null)
            return fail(_("Invalid size"), cockpit.format(_("'$0' is no size (like 10G)"), v.size));
        return managerCall("CreateImage", [v.path, size, opts({ format: ["s", v.format], backing: ["s", v.format === "qcow2" ? v.backing : ""] })]);
    });
}

function dialogCheck(image) {
    dialog(cockpit.format(_("Check $0"), basename(image.Path)), [
        { id: "repair", label: _("Repair"), type: "select", value: "", options: [["", _("no, only check")], ["leaks", _("leaked clusters")], ["all", _("leaks and errors")]] },
    ], _("Check"), v => image.call("Check", [opts({ repair: ["s", v.repair] })]).then(([r]) => {
        const get = k => (r[k] ? r[k].v : 0);
        const text = cockpit.format(_("$0 corruptions, $1 leaks, $2 check errors"), get("corruptions"), get("leaks"), get("check-errors"));
        if (get("corruptions") || get("check-errors"))
            return fail(_("The image has errors"), text);
        return Promise.reject({ title: _("The image is clean"), text, ok: true }); /* shown in the dialog, which stays open */
    }));
}

function dialogResize(image) {
    dialog(cockpit.format(_("Resize $0"), basename(image.Path)), [
        { id: "size", label: _("New size"), value: bytes(image.VirtualSize).replace(/ (.)iB$/, "$1").replace(" B", ""), help: cockpit.format(_("Now $0; images only grow."), bytes(image.VirtualSize)) },
    ], _("Resize"), v => {
        const size = parseSize(v.size);
        if (size === null)
            return fail(_("Invalid size"), v.size);
        return image.call("Resize", [size, {}]);
    });
}

function dialogDelete(image) {
    dialog(cockpit.format(_("Delete $0?"), basename(image.Path)), [], _("Delete"),
           () => image.call("Delete", [{}]), cockpit.format(_("$0 is removed from the disk. An image other images are built on is refused."), image.Path));
}

function dialogSpeed(job) {
    dialog(cockpit.format(_("Speed of $0"), job.Id), [
        { id: "speed", label: _("Bytes per second"), value: job.Speed ? bytes(job.Speed).replace(/ (.)iB$/, "$1") : "", placeholder: _("empty: no limit") },
    ], _("Set"), v => job.call("SetSpeed", [speedOpt(v.speed) || 0]));
}

function dialogRestore(plan, point) {
    dialog(cockpit.format(_("Restore $0"), point), [
        { id: "target", label: _("New image"), value: plan.Name + "-restored-" + point + ".qcow2" },
        { id: "how", label: _("As"), type: "select", value: "flat", options: [["flat", _("a standalone copy")], ["chain", _("an overlay of the backup (ready at once)")], ["live", _("live: serve over NBD now, copy in the background")]] },
    ], _("Restore"), v => plan.call("Restore", [point, v.target, opts({ chain: ["b", v.how === "chain" || undefined], live: ["b", v.how === "live" || undefined] })])
            .then(([obj]) => { if (obj && obj !== "/") { state.tab = "jobs"; showTab() } }));
}

/* The settings a plan's dialogs edit, as Manager.CreatePlan and Plan.Change take them. */
function planFields(plan, chains) {
    const keep = (plan && plan.Retention) || {};
    return [
        { id: "destination", label: _("Destination"), value: plan ? plan.Destination : "backups", help: _("A directory in the storage roots, or an NBD URI for a replica") },
        { id: "schedule", label: _("Schedule"), value: plan ? plan.Schedule : "daily", help: _("systemd calendar syntax, e.g. *-*-* 01:30:00") },
        { id: "level", label: _("Level"), type: "select", value: plan ? plan.Level : "auto", options: [["auto", "auto"], ["full", "full"], ["incremental", "incremental"], ["differential", "differential"]] },
        { id: "mode", label: _("Mode"), type: "select", value: plan ? plan.Mode : "push", options: [["push", _("push")], ["pull", _("pull (fleecing: the guest never waits on the destination)")]] },
        { id: "daily", label: _("Keep daily"), value: plan ? String(keep.KeepDaily || "") : "7" },
        { id: "weekly", label: _("Keep weekly"), value: plan ? String(keep.KeepWeekly || "") : "4" },
        { id: "monthly", label: _("Keep monthly"), value: plan ? String(keep.KeepMonthly || "") : "" },
    ];
}

function planSettings(v) {
    const n = k => (v[k] === "" ? (v.destination.includes("://") ? undefined : 0) : Number(v[k]));
    const replica = v.destination.includes("://");
    for (const k of ["daily", "weekly", "monthly"])
        if (v[k] !== "" && !/^\d+$/.test(v[k]))
            throw { title: _("Invalid number"), text: cockpit.format(_("keep $0: '$1' is no number"), k, v[k]) };
    return opts({
        chain: ["s", v.chain], destination: ["s", v.destination], schedule: ["s", v.schedule], level: ["s", v.level],
        mode: ["s", v.mode], "keep-daily": ["u", replica ? undefined : n("daily")],
        "keep-weekly": ["u", replica ? undefined : n("weekly")], "keep-monthly": ["u", replica ? undefined : n("monthly")],
    });
}

function dialogEditPlan(plan) {
    dialog(cockpit.format(_("Edit plan $0"), plan.Name), planFields(plan), _("Save"),
           v => plan.call("Change", [planSettings(v)]));
}

function dialogBitmaps(image) {
    const list = (image.Bitmaps || []).map(([name, gran, dirty, recording, busy, persistent, inconsistent]) =>
        h("li", { class: "dc-bitmap", "data-bitmap": name },
          h("strong", {}, name), " ",
          cockpit.format(_("$0 changed since it started, granularity $1"), bytes(dirty), bytes(gran)), " ",
          recording ? null : label(_("disabled")), persistent ? null : label(_("transient")),
          inconsistent ? label(_("inconsistent"), "red") : null, busy ? label(_("in use"), "orange") : null));
    dialog(cockpit.format(_("Bitmaps of $0"), basename(image.Path)), [
        { id: "name", label: _("Add a bitmap"), placeholder: _("name"), help: _("It records every change from now on, for incremental backups") },
        { id: "which", label: _("Or change"), type: "select", value: "", options: [["", _("no bitmap")]].concat((image.Bitmaps || []).map(b => [b[0], b[0]])) },
        { id: "op", label: _("Action"), type: "select", value: "RemoveBitmap", show: v => !!v.which,
          options: [["RemoveBitmap", _("remove")], ["ClearBitmap", _("clear (start again from now)")], ["DisableBitmap", _("stop recording")], ["EnableBitmap", _("record again")]] },
    ], _("Apply"), v => {
        if (!v.name && !v.which)
            return fail(_("Nothing to do"), _("Name a bitmap to add, or choose one to change."));
        const steps = [];
        if (v.which)
            steps.push(() => image.call(v.op, [v.which]));
        if (v.name)
            steps.push(() => image.call("AddBitmap", [v.name, {}]));
        return steps.reduce((p, f) => p.then(f), Promise.resolve());
    }, list.length ? h("ul", { class: "dc-bitmaps" }, list) : _("No bitmaps yet."));
}

function dialogCreatePlan() {
    const chains = valid(P.Chain).map(c => P.Image[c.Active]).filter(Boolean);
    dialog(_("Create a backup plan"), [
        { id: "name", label: _("Name"), value: chains.length ? stem(chains[0].Path) : "" },
        { id: "chain", label: _("Chain"), type: "select", value: chains.length ? chains[0].Path : "", options: chains.map(i => [i.Path, basename(i.Path)]) },
    ].concat(planFields(null)), _("Create"), v => managerCall("CreatePlan", [v.name, planSettings(v)])
            .then(() => { state.tab = "plans"; showTab() }));
}

/* --- tabs, signals, startup ---------------------------------------------------------------------- */

function showTab() {
    for (const li of document.querySelectorAll("#tabs [data-tab]"))
        li.classList.toggle("pf-m-current", li.dataset.tab === state.tab);
    for (const v of document.querySelectorAll("[data-view]"))
        v.hidden = v.dataset.view !== state.tab;
    cockpit.location.go([state.tab]);
    redraw();
}

for (const li of document.querySelectorAll("#tabs [data-tab]"))
    li.querySelector("button").addEventListener("click", () => { state.tab = li.dataset.tab; showTab() });

/* The job signals, in place: an error's operation and action, the outcome of a job that ends. */
client.subscribe({ interface: IF("Job") }, (path, iface, signal, args) => {
    const job = P.Job[path];
    const id = job ? job.Id : basename(path);
    if (signal === "BlockJobError")
        state.jobEvents[path] = { kind: "error", variant: "danger", title: cockpit.format(_("I/O error on $0"), args[1]), text: cockpit.format(_("action: $0"), args[2]) };
    else if (signal === "BlockJobReady")
        state.jobEvents[path] = { kind: "ready", variant: "info", title: _("In sync"), text: _("Complete the job to switch over, or cancel it to keep a copy.") };
    else if (signal === "BlockJobCompleted" || signal === "BlockJobCancelled") {
        const error = signal === "BlockJobCompleted" ? args[args.length - 1] : "";
        const ok = signal === "BlockJobCompleted" && !error;
        const type = job ? job.Type : "";
        state.finished.push({ id, type, ok, cancelled: signal === "BlockJobCancelled", text: ok ? cockpit.format(_("Job $0 ($1) completed"), id, type) : signal === "BlockJobCancelled" ? cockpit.format(_("Job $0 ($1) was cancelled"), id, type) : cockpit.format(_("Job $0 ($1) failed: $2"), id, type, error) });
        renderNotices();
    }
    redraw();
});

for (const proxies of Object.values(P)) {
    proxies.addEventListener("added", redraw);
    proxies.addEventListener("changed", redraw);
    proxies.addEventListener("removed", (ev, proxy) => {
        delete state.jobEvents[proxy.path];
        delete state.jobErrors[proxy.path];
        redraw();
    });
}

/* The daemon is bus-activated and leaves when idle: a call starts it, and the proxies fill in. */
function activate() {
    return client.call(ROOT, "org.freedesktop.DBus.Properties", "GetAll", [IF("Manager")]).then(([props]) => {
        state.manager = { Version: props.Version.v, StorageRoots: props.StorageRoots.v };
        redraw();
    }).catch(err => {
        const box = document.getElementById("notices");
        box.hidden = false;
        box.replaceChildren(alert("danger", _("Cannot reach diskchaind"), describeError(err).text, { "data-error": "service" }));
    });
}
/*
 * diskchaind leaves when idle (no job, export or call for its idle timeout)
 * and comes back with the next call.  While the page is open that next call
 * is made at once: the view stays as it was drawn until the objects are back.
 */
client.addEventListener("owner", (ev, owner) => {
    const was = state.owner;
    state.owner = owner;
    if (owner === null && was) {
        state.reconnecting = true;
        document.body.dataset.reconnects = String(Number(document.body.dataset.reconnects || 0) + 1);
        window.setTimeout(() => activate().then(() => Promise.all(Object.values(P).map(p => p.wait())))
                .then(() => { state.reconnecting = false; redraw() }), 200);
    }
    redraw();
});
client.addEventListener("close", (ev, options) => {
    const box = document.getElementById("notices");
    box.hidden = false;
    box.replaceChildren(alert("danger", _("Disconnected from the system bus"), (options && options.problem) || ""));
});

cockpit.location.path[0] && ["chains", "jobs", "exports", "plans"].includes(cockpit.location.path[0]) && (state.tab = cockpit.location.path[0]);
renderNotices();
showTab();
activate().then(() => Promise.all(Object.values(P).map(p => p.wait())).then(redraw));
