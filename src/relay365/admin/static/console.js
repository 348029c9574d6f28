// relay365 console: live updates (server-sent events) and select-all. Served as a file: the
// Content-Security-Policy forbids inline script.
"use strict";

function busy() {
  // Do not replace the page under someone who is choosing messages or typing.
  const active = document.activeElement;
  if (active && ["INPUT", "SELECT", "TEXTAREA"].includes(active.tagName)) return true;
  return document.querySelectorAll("input.pick:checked").length > 0;
}

async function refresh() {
  const response = await fetch(window.location.href, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok || response.redirected) return;
  const doc = new DOMParser().parseFromString(await response.text(), "text/html");
  const fresh = doc.getElementById("main");
  const main = document.getElementById("main");
  if (fresh && main) {
    main.replaceChildren(...fresh.childNodes);
    wire();
  }
}

function live() {
  if (!document.body.dataset.live || !window.EventSource) return;
  const state = document.getElementById("live-state");
  const since = encodeURIComponent(document.body.dataset.version || "");
  const source = new EventSource("/api/events?since=" + since);
  let pending = false;
  source.addEventListener("open", () => { if (state) state.textContent = "live"; });
  source.addEventListener("error", () => { if (state) state.textContent = "reconnecting"; });
  source.addEventListener("changed", () => {
    if (pending) return;
    pending = true;
    setTimeout(async () => {
      pending = false;
      if (!busy()) {
        try { await refresh(); } catch (e) { /* the next event tries again */ }
      }
    }, 250);
  });
}

function wire() {
  const all = document.getElementById("select-all");
  if (all) {
    all.addEventListener("change", () => {
      document.querySelectorAll("input.pick").forEach((box) => { box.checked = all.checked; });
    });
  }
  document.querySelectorAll("button.danger").forEach((button) => {
    button.addEventListener("click", (event) => {
      if (!window.confirm("Delete the chosen message(s)? No bounce is sent; this cannot be undone.")) {
        event.preventDefault();
      }
    });
  });
}

document.addEventListener("DOMContentLoaded", () => { wire(); live(); });
