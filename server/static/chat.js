// Shared by the playground pages (/ui, /ui/fine-tune), loaded before each page's own script, which defines
// `keyInput` (the API key the user typed): its headers, a JSON call to the API, and one streamed chat
// completion into `target`, token by token.

function headers(extra = {}) {
  const h = { ...extra };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  const body = r.headers.get("content-type")?.includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw new Error(body?.error?.message || `HTTP ${r.status}`);
  return body;
}

async function stream(body, target) {
  target.textContent = "";
  const r = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body),
  });
  if (!r.ok) { const e = await r.json(); target.textContent = "error: " + e.error.message; target.classList.add("error"); return; }
  target.classList.remove("error");
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      for (const c of chunk.choices || []) target.textContent += c.delta?.content || "";
    }
  }
}
