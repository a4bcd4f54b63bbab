// The audit's review page: one card per finding, grouped by kind, and a
// keyboard scheme to keep, drop or relabel each. Every decision is POSTed at
// once and the card shows what the server saved (or why it refused).
// No build step, no external scripts (the machine may be offline).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {classes: [], cards: [], selected: -1, kinds: new Map(), total: 0};

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function imageUrl(path) {
  return `/audit/image?path=${encodeURIComponent(path)}`;
}

function thumb(path, caption, className) {
  const fig = el("figure", className);
  const img = el("img");
  img.src = imageUrl(path);
  img.alt = path;
  img.loading = "lazy";
  fig.append(img, el("figcaption", "", caption));
  return fig;
}

function describe(decision, newExpression) {
  if (decision === "keep") return "saved: keep";
  if (decision === "drop") return "saved: drop";
  if (decision === "relabel") return `saved: relabel → ${newExpression}`;
  return "";
}

// ---------------------------------------------------------------- rendering

function makeCard(item) {
  const card = el("article", "card");
  card.dataset.path = item.path;
  card.dataset.kind = item.kind;
  card.dataset.decision = item.decision;
  card.dataset.newExpression = item.new_expression;
  card.dataset.state = item.decision ? "saved" : "";

  const thumbs = el("div", "thumbs");
  thumbs.append(thumb(item.path, item.expression || "unlabelled", "main"));
  for (const rel of item.related) {
    const label = rel.expression ? `${rel.expression}: ${rel.path}` : rel.path;
    thumbs.append(thumb(rel.path, label, "related"));
  }
  if (item.suggested_expression) {
    thumbs.append(el("div", "suggested", `suggested: ${item.suggested_expression}`));
  }

  const info = el("div", "info");
  info.append(el("div", "path", item.path));
  const dl = el("dl");
  const rows = [["score", item.score === null ? "n/a" : String(item.score)],
                ["detail", item.detail], ["label", item.expression || "(none)"],
                ["subject", item.subject || "(unknown)"],
                ["suggestion", item.suggestion]];
  if (item.related.length) rows.push(["near-duplicates", String(item.related.length)]);
  for (const [k, v] of rows) {
    const dd = el("dd", "", v);
    dd.dataset.field = k;
    dl.append(el("dt", "", k), dd);
  }
  info.append(dl);

  const actions = el("div", "actions");
  const button = (text, onClick) => {
    const b = el("button", "", text);
    b.type = "button";
    b.addEventListener("click", (e) => { e.stopPropagation(); onClick(); });
    return b;
  };
  actions.append(button("keep (a)", () => decideCard(card, "keep", "")),
                 button("drop (d)", () => decideCard(card, "drop", "")));
  if (item.suggested_expression) {
    actions.append(button(`relabel → ${item.suggested_expression} (r)`,
                          () => decideCard(card, "relabel", item.suggested_expression)));
  }
  const select = el("select");
  select.append(new Option("relabel to… (1–7)", ""));
  state.classes.forEach((c, i) => select.append(new Option(`${i + 1} ${c}`, c)));
  select.addEventListener("change", () => {
    if (select.value) decideCard(card, "relabel", select.value);
    select.value = "";
    select.blur();
  });
  actions.append(select, button("undo (u)", () => decideCard(card, "", "")));
  info.append(actions);
  info.append(el("div", "state", describe(item.decision, item.new_expression)));

  card.append(thumbs, info);
  card.item = item;
  card.pending = Promise.resolve();
  card.addEventListener("click", () => select_(state.cards.indexOf(card)));
  return card;
}

function kindLabel(kind) {
  const k = state.kinds.get(kind);
  return `${kind} ${k.count} (${k.decided} decided)`;
}

function render(data) {
  state.classes = data.classes;
  state.total = data.total;
  $("data-dir").textContent = data.data_dir;
  $("findings-path").textContent = data.findings_path;
  $("reviewed-path").textContent =
      `${data.reviewed_path} (journal: ${data.journal_path})`;
  $("class-keys").textContent =
      data.classes.map((c, i) => `${i + 1} ${c}`).join(", ");
  const nav = $("kinds");
  const main = $("findings");
  nav.replaceChildren();
  main.replaceChildren();
  state.cards = [];
  for (const group of data.kinds) {
    state.kinds.set(group.kind, {count: group.count, decided: group.decided, first: -1});
    const link = el("a");
    link.href = `#kind-${group.kind}`;
    link.dataset.kind = group.kind;
    nav.append(link);
    const section = el("section", "kind");
    section.id = `kind-${group.kind}`;
    section.dataset.kind = group.kind;
    section.append(el("h2"));
    state.kinds.get(group.kind).first = state.cards.length;
    for (const item of group.items) {
      const card = makeCard(item);
      state.cards.push(card);
      section.append(card);
    }
    main.append(section);
  }
  if (!state.cards.length) main.append(el("p", "", "The audit found nothing to review."));
  updateCounts(data.decided, data.total);
  const firstOpen = state.cards.findIndex((c) => !c.dataset.decision);
  select_(firstOpen >= 0 ? firstOpen : 0);
}

function updateCounts(decided, total) {
  $("progress").textContent = `${decided} / ${total} decided`;
  $("progress").dataset.decided = String(decided);
  for (const link of $("kinds").children) link.textContent = kindLabel(link.dataset.kind);
  for (const section of $("findings").querySelectorAll("section.kind")) {
    section.querySelector("h2").textContent = kindLabel(section.dataset.kind);
  }
}

// ---------------------------------------------------------------- selection

function select_(index) {
  if (!state.cards.length) return;
  index = Math.max(0, Math.min(state.cards.length - 1, index));
  if (state.selected >= 0 && state.cards[state.selected]) {
    state.cards[state.selected].classList.remove("selected");
  }
  state.selected = index;
  const card = state.cards[index];
  card.classList.add("selected");
  card.scrollIntoView({block: "nearest"});
  for (const link of $("kinds").children) {
    link.classList.toggle("current", link.dataset.kind === card.dataset.kind);
  }
}

function jumpKind(step) {
  const firsts = [...state.kinds.values()].map((k) => k.first);
  const current = state.cards[state.selected];
  const at = [...state.kinds.keys()].indexOf(current ? current.dataset.kind : "");
  const target = firsts[Math.max(0, Math.min(firsts.length - 1, at + step))];
  if (target !== undefined) select_(target);
}

// ---------------------------------------------------------------- decisions

async function postDecision(body) {
  const resp = await fetch("/audit/api/decision", {
    method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json"},
  });
  let answer;
  try {
    answer = await resp.json();
  } catch (e) {
    throw new Error(`server answered ${resp.status} ${resp.statusText}`);
  }
  if (!resp.ok) throw new Error(answer.error || `server answered ${resp.status}`);
  return answer;
}

function showState(card, stateName, text) {
  card.dataset.state = stateName;
  card.querySelector(".state").textContent = text;
}

// A card's decisions are sent one after another, so the server saves them in
// the order they were made and the last key pressed is the one that wins.
function decideCard(card, decision, newExpression) {
  showState(card, "saving", "saving…");
  card.pending = card.pending.then(async () => {
    try {
      const saved = await postDecision({path: card.dataset.path, kind: card.dataset.kind,
                                        decision, new_expression: newExpression});
      const before = Boolean(card.dataset.decision);
      card.dataset.decision = saved.decision;
      card.dataset.newExpression = saved.new_expression;
      const kind = state.kinds.get(card.dataset.kind);
      kind.decided += Number(Boolean(saved.decision)) - Number(before);
      showState(card, saved.decision ? "saved" : "",
                saved.decision ? describe(saved.decision, saved.new_expression)
                               : "undone: undecided");
      updateCounts(saved.decided, saved.total);
    } catch (e) {
      // The saved decision (if any) stands; the message says why this one did not.
      showState(card, "error", `not saved: ${e.message}`);
    }
  });
}

function decideSelected(decision, newExpression) {
  const card = state.cards[state.selected];
  if (!card) return;
  decideCard(card, decision, newExpression);
  if (decision) select_(state.selected + 1);
}

function onKey(e) {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  const tag = document.activeElement ? document.activeElement.tagName : "";
  if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") return;
  const card = state.cards[state.selected];
  const key = e.key;
  if (key === "j" || key === "ArrowDown") {
    select_(state.selected + 1);
  } else if (key === "k" || key === "ArrowUp") {
    select_(state.selected - 1);
  } else if (key === "]") {
    jumpKind(1);
  } else if (key === "[") {
    jumpKind(-1);
  } else if (key === "a") {
    decideSelected("keep", "");
  } else if (key === "d") {
    decideSelected("drop", "");
  } else if (key === "r") {
    if (!card) return;
    if (card.item.suggested_expression) {
      decideSelected("relabel", card.item.suggested_expression);
    } else {
      showState(card, "error", "no suggested label here: press 1–7 to pick one");
    }
  } else if (/^[1-9]$/.test(key) && Number(key) <= state.classes.length) {
    decideSelected("relabel", state.classes[Number(key) - 1]);
  } else if (key === "u") {
    if (card) decideCard(card, "", "");
  } else {
    return;
  }
  e.preventDefault();
}

async function load() {
  try {
    const resp = await fetch("/audit/api/findings", {cache: "no-store"});
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || `server answered ${resp.status}`);
    render(data);
    document.body.dataset.loaded = "true";
  } catch (e) {
    $("load-error").hidden = false;
    $("load-error").textContent = `could not load the findings: ${e.message}`;
  }
}

document.addEventListener("keydown", onKey);
load();
