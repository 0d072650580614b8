// Shared by the playground pages (/ui, /ui/fine-tune): one streamed chat completion into `target`, token by
// token. `headers(extra)` is the page's own (the API key the user typed).

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
