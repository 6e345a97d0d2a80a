// Corrections on the page of `prn serve`: on a result card an operator marks the verdict wrong.
// A part judged defective that is good is saved as good; a defect the model missed is painted
// (brush, eraser or box over the image) and saved with its mask. The server keeps the image it
// scored and stores both in its corrections folder (docs/serve.md), so only the result's id, the
// label and the mask travel. Loaded before app.js, which calls attach() and start().
"use strict";

(() => {
  const CANVAS_MAX_SIDE = 2048;   // masks are painted at most this large; the server scales them up
  const EDIT_MAX_HEIGHT_REM = 20; // the painted picture's height on screen, at most
  const PAINT = "#ff2d55";
  let enabled = false;

  const el = (tag, props = {}, ...children) => {
    const node = Object.assign(document.createElement(tag), props);
    node.append(...children);
    return node;
  };
  const page = () => window.prnPage;  // app.js's state and fetch helper (api), loaded after this

  // ------------------------------------------------------------------------- the session's list

  async function refresh() {
    if (!enabled) return;
    try {
      const list = await page().api("corrections");
      const n = list.count;
      document.getElementById("corrections-info").textContent =
        `${n} correction${n === 1 ? "" : "s"} stored in ${list.folder}`;
      document.getElementById("corrections-zip").classList.toggle("disabled", n === 0);
    } catch (e) {
      document.getElementById("corrections-info").textContent = `Corrections not listed: ${e.message}`;
    }
  }

  function start(model) {
    enabled = Boolean(model.corrections);
    document.getElementById("corrections").hidden = !enabled;
    const operator = document.getElementById("operator");
    operator.value = localStorage.getItem("prn-operator") || "";
    operator.addEventListener("change", () => localStorage.setItem("prn-operator", operator.value.trim()));
    refresh();
  }

  // ------------------------------------------------------------------------- painting

  function editor(r) {
    // Two canvases at the image's aspect: the photo below, the paint above (shown see-through).
    const scale = Math.min(1, CANVAS_MAX_SIDE / Math.max(r.width, r.height));
    const w = Math.max(1, Math.round(r.width * scale)), h = Math.max(1, Math.round(r.height * scale));
    const photo = el("canvas", { className: "photo", width: w, height: h });
    const paint = el("canvas", { className: "paint", width: w, height: h });
    const image = new Image();
    image.onload = () => photo.getContext("2d").drawImage(image, 0, 0, w, h);
    image.src = r.imageUrl;

    const tools = {};
    let tool = "brush";
    const toolbar = el("div", { className: "toolbar" });
    for (const name of ["brush", "eraser", "box"]) {
      tools[name] = el("button", { type: "button", className: `tool ${name}`, textContent: name });
      tools[name].addEventListener("click", () => select(name));
      toolbar.append(tools[name]);
    }
    const size = el("input", { type: "range", className: "size", min: 1, max: Math.max(8, Math.round(Math.max(w, h) / 8)),
                               value: Math.max(2, Math.round(Math.max(w, h) / 40)), title: "brush size" });
    const clear = el("button", { type: "button", className: "clear", textContent: "clear" });
    clear.addEventListener("click", () => ctx.clearRect(0, 0, w, h));
    toolbar.append(el("label", { className: "hint" }, "size ", size), clear);
    const select = (name) => {
      tool = name;
      for (const [key, button] of Object.entries(tools)) button.classList.toggle("on", key === name);
    };
    select("brush");

    const ctx = paint.getContext("2d");
    let last = null, start = null, before = null;
    const at = (e) => {
      const box = paint.getBoundingClientRect();
      return [(e.clientX - box.left) * w / box.width, (e.clientY - box.top) * h / box.height];
    };
    const stroke = (from, to) => {
      ctx.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = PAINT;
      ctx.lineWidth = Number(size.value);
      ctx.lineCap = ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(...from);
      ctx.lineTo(...to);
      ctx.stroke();
    };
    const rect = (p) => {
      ctx.putImageData(before, 0, 0);
      ctx.globalCompositeOperation = "source-over";
      ctx.fillStyle = PAINT;
      ctx.fillRect(Math.min(start[0], p[0]), Math.min(start[1], p[1]), Math.abs(p[0] - start[0]) || 1,
                   Math.abs(p[1] - start[1]) || 1);
    };
    paint.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      paint.setPointerCapture(e.pointerId);
      last = start = at(e);
      if (tool === "box") before = ctx.getImageData(0, 0, w, h);
      else stroke(last, last);
    });
    paint.addEventListener("pointermove", (e) => {
      if (!last) return;
      const p = at(e);
      if (tool === "box") rect(p);
      else stroke(last, p);
      last = p;
    });
    const up = (e) => {
      if (last && tool === "box") rect(at(e));
      last = start = before = null;
    };
    paint.addEventListener("pointerup", up);
    paint.addEventListener("pointercancel", up);

    // at most EDIT_MAX_HEIGHT tall on screen, at the image's aspect
    const wrap = el("div", { className: "canvas-wrap" }, photo, paint);
    wrap.style.width = `min(100%, ${(EDIT_MAX_HEIGHT_REM * w / h).toFixed(3)}rem)`;
    const node = el("div", { className: "editor" }, toolbar, wrap);
    return { node, paint, mask: () => maskPng(paint) };
  }

  function maskPng(paint) {
    // White where anything is painted (any alpha), black elsewhere: the server's mask format.
    const { width: w, height: h } = paint;
    const data = paint.getContext("2d").getImageData(0, 0, w, h).data;
    const out = document.createElement("canvas");
    out.width = w; out.height = h;
    const octx = out.getContext("2d");
    const pixels = octx.createImageData(w, h);
    let painted = 0;
    for (let i = 0; i < data.length; i += 4) {
      const on = data[i + 3] > 0 ? 255 : 0;
      painted += on ? 1 : 0;
      pixels.data[i] = pixels.data[i + 1] = pixels.data[i + 2] = on;
      pixels.data[i + 3] = 255;
    }
    octx.putImageData(pixels, 0, 0);
    return new Promise((resolve) => out.toBlob((blob) => resolve({ blob, painted }), "image/png"));
  }

  // ------------------------------------------------------------------------- the card's control

  function attach(r) {
    if (!enabled) return;
    const box = el("div", { className: "correct" });
    const wrong = el("button", { type: "button", className: "wrong", textContent: "wrong?",
                                 title: "the verdict is wrong: correct it (stored for retraining)" });
    box.append(wrong);
    r.card.append(box);
    wrong.addEventListener("click", () => open(r, box, wrong));
  }

  function open(r, box, wrong) {
    wrong.hidden = true;
    const panel = el("div", { className: "panel" });
    const message = el("p", { className: "note" });
    const cancel = el("button", { type: "button", className: "cancel", textContent: "cancel" });
    const close = () => { panel.remove(); r.card.classList.remove("editing"); wrong.hidden = false; };
    cancel.addEventListener("click", close);
    const verdict = page().verdictWord(r);

    const asGood = el("button", { type: "button", className: "save-good", textContent: "save as good" });
    asGood.addEventListener("click", () => save(r, panel, message, "good", null, null));
    const toPaint = el("button", { type: "button", className: "paint-defect", textContent: "it is defective: paint it" });
    toPaint.addEventListener("click", () => paintMode());

    function paintMode() {
      panel.replaceChildren();
      r.card.classList.add("editing");
      const ed = editor(r);
      const kind = el("input", { type: "text", className: "kind", placeholder: "missed", maxLength: 40,
                                 title: "defect kind (folder name): lower-case letters, digits, _ or -" });
      const saveDefect = el("button", { type: "button", className: "save-defect", textContent: "save defect" });
      saveDefect.addEventListener("click", () => save(r, panel, message, "defective", ed, kind.value.trim()));
      panel.append(el("p", { className: "hint" }, "Paint the missed defect (brush, eraser, or drag a box), then save."),
                   ed.node, el("div", { className: "actions" }, el("label", { className: "hint" }, "kind ", kind),
                                                                 saveDefect, cancel), message);
    }

    if (verdict === "defective") {
      panel.append(el("p", { className: "hint" }, "Judged defective. If the part is good:"),
                   el("div", { className: "actions" }, asGood, cancel), message);
    } else if (verdict === "good") {
      panel.append(message);
      paintMode();
    } else {
      panel.append(el("p", { className: "hint" }, "Not judged. The part is:"),
                   el("div", { className: "actions" }, asGood, toPaint, cancel), message);
    }
    box.append(panel);
  }

  async function save(r, panel, message, label, ed, kind) {
    const p = page();
    const form = new FormData();
    form.append("result", r.id);
    form.append("label", label);
    if (kind) form.append("kind", kind);
    const operator = document.getElementById("operator").value.trim();
    if (operator) form.append("operator", operator);
    if (p.state.threshold !== null) form.append("page_threshold", String(p.state.threshold));
    form.append("page_verdict", p.verdictWord(r));
    if (ed) {
      const { blob, painted } = await ed.mask();
      if (!painted) {
        message.textContent = "Nothing is painted yet: paint the defect first.";
        message.classList.add("error");
        return;
      }
      form.append("mask", blob, "mask.png");
    }
    for (const button of panel.querySelectorAll("button")) button.disabled = true;
    try {
      const record = await page().api("corrections", { method: "POST", body: form });
      r.correction = record;
      r.card.classList.add("corrected");
      r.card.dataset.correction = record.id;
      const done = el("p", { className: "saved" },
                      `Saved as ${record.label}: ${record.image}` + (record.mask ? ` and ${record.mask}` : ""));
      for (const done of panel.querySelectorAll(".toolbar, .actions, p.hint")) done.remove();
      message.replaceWith(done);
      for (const canvas of panel.querySelectorAll("canvas.paint")) canvas.style.pointerEvents = "none";
      p.say(`Correction saved: ${r.name} is ${record.label}.`);
      refresh();
    } catch (e) {
      message.textContent = `Not saved: ${e.message}`;
      message.classList.add("error");
      for (const button of panel.querySelectorAll("button")) button.disabled = false;
    }
  }

  window.prnCorrections = { attach, start, refresh };
})();
