"""The web page at ``/``: a chat with the served model and a live view of where the sessions' KV memory lives.

One self-contained HTML document (no external scripts or styles, so it works offline). It streams replies from
``/v1/chat/completions`` and polls ``/tiermem/status`` every two seconds. Under each reply: its prompt and cached
tokens, the time to its first token and the turn's time (measured in the browser). ``tests/test_serve_page.py``
drives it in a headless Chromium.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tiermem serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:15px system-ui,sans-serif;margin:0;display:flex;height:100vh}
#chat{flex:2;display:flex;flex-direction:column;padding:12px;gap:8px}
#log{flex:1;overflow:auto;border:1px solid #ccc;padding:8px;white-space:pre-wrap}
.user{color:#034}.assistant{color:#222}.meta{color:#777;font-size:12px}
#memory{flex:1;padding:12px;border-left:1px solid #ccc;overflow:auto;font-size:13px}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #eee;padding:2px 4px;text-align:right}
.bar{height:10px;background:#4a8}
</style></head><body>
<div id="chat">
  <div><label>API key <input id="key" type="password" size="24"></label>
  <button id="reset" type="button">new chat</button></div>
  <div id="log" aria-live="polite"></div>
  <form id="form"><input id="input" size="60" autocomplete="off" placeholder="Message">
  <button id="send" type="submit">Send</button></form>
</div>
<div id="memory"><h3>KV memory</h3><div id="tiers"></div><h4>Your sessions</h4><table id="sessions"></table></div>
<script>
const $ = (id) => document.getElementById(id);
let messages = [];
let model = null;
$("key").value = localStorage.getItem("tiermem-key") || "";
$("key").onchange = () => localStorage.setItem("tiermem-key", $("key").value);
const headers = () => {
  const h = {"content-type": "application/json"};
  if ($("key").value) h.authorization = "Bearer " + $("key").value;
  return h;
};
function line(cls, text) {
  const div = document.createElement("div");
  div.className = cls; div.textContent = text; $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight; return div;
}
async function getModel() {
  if (model) return model;
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error.message);
  return (model = body.data[0].id);
}
$("reset").onclick = () => { messages = []; $("log").textContent = ""; };
$("form").onsubmit = async (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text) return;
  $("input").value = "";
  messages.push({role: "user", content: text});
  line("user", "you: " + text);
  const out = line("assistant", "");
  const meta = line("meta", "");
  const began = performance.now(); let first = null; let usage = "";
  const timing = () => (first === null ? "" : `; first token ${Math.round(first - began)} ms`) +
    `, turn ${Math.round(performance.now() - began)} ms`;
  try {
    const body = {model: await getModel(), messages, stream: true, stream_options: {include_usage: true}};
    const r = await fetch("/v1/chat/completions", {method: "POST", headers: headers(), body: JSON.stringify(body)});
    if (!r.ok) { out.textContent = "error: " + (await r.json()).error.message; messages.pop(); return; }
    const reader = r.body.getReader(); const decoder = new TextDecoder(); let buffer = ""; let reply = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) { out.textContent += " [error: " + chunk.error.message + "]"; continue; }
        if (chunk.usage) {
          const u = chunk.usage;
          usage = `prompt ${u.prompt_tokens} tokens (${u.prompt_tokens_details.cached_tokens} cached), ` +
            `reply ${u.completion_tokens}`;
        }
        for (const c of chunk.choices || []) {
          if (c.delta && c.delta.content) { reply += c.delta.content; if (first === null) first = performance.now(); }
        }
        out.textContent = "model: " + reply;
      }
    }
    meta.textContent = usage + timing();
    messages.push({role: "assistant", content: reply});
  } catch (err) { out.textContent = "error: " + err.message; messages.pop(); }
};
const mib = (n) => (n / 1048576).toFixed(2) + " MiB";
async function poll() {
  try {
    const r = await fetch("/tiermem/status", {headers: headers()});
    if (r.ok) {
      const s = await r.json();
      const limit = s.kv_memory || Math.max(s.bytes.ram, 1);
      $("tiers").innerHTML = "";
      const ram = document.createElement("div");
      ram.textContent = `RAM: ${s.sessions.ram} sessions, ${mib(s.bytes.ram)}` +
        (s.kv_memory ? ` of ${mib(s.kv_memory)}` : "");
      const bar = document.createElement("div"); bar.className = "bar";
      bar.style.width = Math.min(100, 100 * s.bytes.ram / limit) + "%";
      const disk = document.createElement("div");
      disk.textContent = `disk: ${s.sessions.disk} sessions, ${mib(s.bytes.disk)}; policy ${s.policy}`;
      $("tiers").append(ram, bar, disk);
      const rows = s.yours.map((x) => `<tr><td>${x.id.slice(5, 13)}</td><td>${x.policy}</td><td>${x.tokens}</td>` +
        `<td>${x.tier}</td><td>${mib(x.ram_bytes)}</td><td>${mib(x.file_bytes)}</td></tr>`);
      $("sessions").innerHTML = "<tr><th>id</th><th>policy</th><th>tokens</th><th>tier</th><th>RAM</th>" +
        "<th>disk</th></tr>" + rows.join("");
    }
  } finally { setTimeout(poll, 2000); }
}
poll();
</script></body></html>
"""
