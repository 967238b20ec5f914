// The shared contract suite (../../tests/contract/cases.json) against the real module under
// convex-test. `cargo test --test contract` runs the same file against the fake Convex
// deployment (through the worker's Convex client) and the embedded local backend.
import { convexTest } from "convex-test";
import { anyApi } from "convex/server";
import { describe, expect, test, vi } from "vitest";
import schema from "./schema";
import suite from "../../tests/contract/cases.json";

const api = anyApi.agentsync;
const modules = {
  ...import.meta.glob("./agentsync.ts"),
  "./_generated/api.js": async () => ({}),
};
const QUERIES = new Set(["listSessions", "listMessages"]);

type Bindings = Map<string, unknown>;

function content(c: any): string {
  return typeof c === "string" ? c : c.repeat.repeat(c.times);
}

/** Substitutes "$name" strings of `v` with their bound values. */
function subst(v: any, b: Bindings): any {
  if (typeof v === "string" && v.startsWith("$") && b.has(v.slice(1))) return b.get(v.slice(1));
  if (Array.isArray(v)) return v.map((x) => subst(x, b));
  if (v !== null && typeof v === "object") {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, subst(x, b)]));
  }
  return v;
}

/** Whether `actual` matches the pattern `want` (see cases.json's "about"), binding as it goes. */
function matches(want: any, actual: any, b: Bindings, at: string): void {
  if (typeof want === "string" && want.startsWith("$")) {
    if (want === "$any") return;
    if (want === "$number") {
      expect(typeof actual, at).toBe("number");
      return;
    }
    if (want.startsWith("$bind:")) {
      b.set(want.slice(6), actual);
      return;
    }
    expect(b.has(want.slice(1)), `${at}: ${want} is bound`).toBe(true);
    expect(actual, at).toEqual(b.get(want.slice(1)));
    return;
  }
  if (Array.isArray(want)) {
    expect(Array.isArray(actual), at).toBe(true);
    expect(actual.length, `${at}.length`).toBe(want.length);
    want.forEach((w, i) => matches(w, actual[i], b, `${at}[${i}]`));
    return;
  }
  if (want !== null && typeof want === "object") {
    expect(actual !== null && typeof actual === "object", at).toBe(true);
    for (const [k, w] of Object.entries(want)) matches(w, actual[k], b, `${at}.${k}`);
    return;
  }
  expect(actual, at).toEqual(want);
}

async function run(steps: any[]) {
  const t = convexTest(schema, modules);
  const b: Bindings = new Map();
  for (const [i, step] of steps.entries()) {
    const at = `step ${i}`;
    if (step.seed === "openChat") {
      const { chatSessionId } = await t.mutation(api.openChat, {
        workerId: step.workerId,
        title: step.title,
      });
      b.set(step.as, chatSessionId);
    } else if (step.seed === "post") {
      for (let n = 0; n < (step.times ?? 1); n++) {
        const { messageId } = await t.mutation(api.postUserMessage, {
          chatSessionId: subst(step.chat, b),
          content: content(step.content),
        });
        if (step.as) b.set(step.as, messageId);
      }
    } else if (step.call) {
      const fn = api[step.call];
      const args = subst(step.args, b);
      const call = QUERIES.has(step.call) ? t.query(fn, args) : t.mutation(fn, args);
      if ("error" in step) {
        await expect(call, at).rejects.toThrow(step.error);
      } else {
        matches(step.ok, await call, b, `${at} ${step.call}`);
      }
    } else if (step.drain) {
      let cursor = subst(step.cursor, b);
      const items: any[] = [];
      let pages = 0;
      for (;;) {
        const page: any = await t.query(api[step.drain], {
          workerId: step.workerId,
          cursor,
          limit: step.limit,
        });
        pages++;
        expect(pages, `${at}: the listing ends`).toBeLessThan(1000);
        if (step.maxPageBytes) {
          expect(JSON.stringify(page).length, `${at}: page ${pages} bytes`).toBeLessThanOrEqual(
            step.maxPageBytes,
          );
        }
        items.push(...page.page);
        cursor = page.continueCursor;
        if (page.isDone) break;
      }
      if (step.minPages) expect(pages, `${at}: pages`).toBeGreaterThanOrEqual(step.minPages);
      if (step.cursorAs) b.set(step.cursorAs, cursor);
      if (step.expectCount !== undefined) expect(items.length, at).toBe(step.expectCount);
      if (step.expect) {
        const key = (x: any) => x.chatSessionId + "/" + (x.messageId ?? "");
        const sorted = (xs: any[]) => (step.anyOrder ? [...xs].sort((x, y) => (key(x) < key(y) ? -1 : 1)) : xs);
        const want = step.anyOrder ? sorted(subst(step.expect, b)) : step.expect;
        matches(want, sorted(items), b, `${at} ${step.drain}`);
      }
    } else if (step.elapse !== undefined) {
      // The clock moves on and the hourly cron's pruning runs (crons.ts).
      if (!vi.isFakeTimers()) vi.useFakeTimers({ now: Date.now() });
      vi.setSystemTime(Date.now() + step.elapse);
      await t.mutation(anyApi.agentsync.pruneAppliedCommands, {});
      await t.finishAllScheduledFunctions(vi.runAllTimers);
    } else if (step.inspect === "failureReason") {
      const doc: any = await t.run((ctx) => ctx.db.get(subst(step.chat, b)));
      expect(doc.failureReason, at).toBe(step.equals);
    } else {
      throw new Error(`${at}: unknown step ${JSON.stringify(step)}`);
    }
  }
}

describe("the shared contract suite (tests/contract/cases.json)", () => {
  for (const c of suite.cases) {
    test(
      c.name,
      async () => {
        try {
          await run(c.steps);
        } finally {
          vi.useRealTimers();
        }
      },
      120_000,
    );
  }
});
