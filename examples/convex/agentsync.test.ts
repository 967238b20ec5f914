// The reference module against convex-test's in-memory Convex: the same promises the Rust
// contract suite (tests/backend.rs) checks of the fake deployment and the local backend.
import { convexTest } from "convex-test";
import { anyApi } from "convex/server";
import { describe, expect, test, vi } from "vitest";
import schema, { chatSessionFields } from "./schema";
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";
import * as agentsync from "./agentsync";
import crons from "./crons";

const api = anyApi.agentsync;
const modules = {
  ...import.meta.glob("./agentsync.ts"),
  // convex-test finds the functions' root by the _generated directory; this module needs none.
  "./_generated/api.js": async () => ({}),
};
const W = "worker-1";

function setup() {
  return convexTest(schema, modules);
}

async function openChat(t: ReturnType<typeof setup>, workerId = W) {
  return (await t.mutation(api.openChat, { workerId, title: "a person's chat" })).chatSessionId;
}

async function post(t: ReturnType<typeof setup>, chatSessionId: string, content: string) {
  return (await t.mutation(api.postUserMessage, { chatSessionId, content })).messageId;
}

async function allMessages(t: ReturnType<typeof setup>, cursor: string | null) {
  const out: any[] = [];
  for (;;) {
    const page = await t.query(api.listMessages, { workerId: W, cursor, limit: 2 });
    out.push(...page.page);
    cursor = page.continueCursor;
    if (page.isDone) return { messages: out, cursor };
  }
}

describe("agentsync contract", () => {
  test("createSession is applied once per commandId", async () => {
    const t = setup();
    const args = { commandId: "createSession:ses_1", workerId: W, agentSessionId: "ses_1", title: "t", model: "mock/echo" };
    const first = await t.mutation(api.createSession, args);
    const again = await t.mutation(api.createSession, args);
    expect(again).toEqual(first);
    const listed = await t.query(api.listSessions, { workerId: W, cursor: null, limit: 10 });
    expect(listed.isDone).toBe(true);
    expect(listed.page).toHaveLength(1);
    expect(listed.page[0]).toMatchObject({
      chatSessionId: first.chatSessionId,
      agentSessionId: "ses_1",
      status: "active",
      model: "mock/echo",
      project: null,
    });
  });

  test("listSessions pages through one worker's sessions", async () => {
    const t = setup();
    for (let i = 0; i < 25; i++) await openChat(t);
    await openChat(t, "another-worker");
    const seen = new Set<string>();
    let cursor: string | null = null;
    let pages = 0;
    for (;;) {
      const page: any = await t.query(api.listSessions, { workerId: W, cursor, limit: 10 });
      pages++;
      expect(page.page.length).toBeLessThanOrEqual(10);
      for (const s of page.page) seen.add(s.chatSessionId);
      cursor = page.continueCursor;
      if (page.isDone) break;
    }
    expect(seen.size).toBe(25);
    expect(pages).toBeGreaterThanOrEqual(3);
  });

  test("renames, links and end states, each idempotent on its commandId", async () => {
    const t = setup();
    const chat = await openChat(t);
    await t.mutation(api.renameSession, { commandId: "r1", chatSessionId: chat, title: "one" });
    await t.mutation(api.renameSession, { commandId: "r2", chatSessionId: chat, title: "two" });
    await t.mutation(api.renameSession, { commandId: "r1", chatSessionId: chat, title: "one" });
    await t.mutation(api.linkAgentSession, { commandId: "l1", chatSessionId: chat, agentSessionId: "ses_9" });
    let row = (await t.query(api.listSessions, { workerId: W, cursor: null, limit: 10 })).page[0];
    expect(row.title).toBe("two");
    expect(row.agentSessionId).toBe("ses_9");
    await t.mutation(api.markSessionFailed, { commandId: "f1", chatSessionId: chat, reason: "stale" });
    row = (await t.query(api.listSessions, { workerId: W, cursor: null, limit: 10 })).page[0];
    expect(row.status).toBe("failed");
    await t.mutation(api.markSessionDeleted, { commandId: "d1", chatSessionId: chat });
    row = (await t.query(api.listSessions, { workerId: W, cursor: null, limit: 10 })).page[0];
    expect(row.status).toBe("deleted");
  });

  test("messages: the cursor sees only changes; one reply however often completeMessage comes; failMessage marks the user message", async () => {
    const t = setup();
    const chat = await openChat(t);
    const asked = await post(t, chat, "question one");
    const doomed = await post(t, chat, "question two");
    const first = await allMessages(t, null);
    expect(first.messages.map((m) => m.messageId)).toEqual([asked, doomed]);
    expect((await allMessages(t, first.cursor)).messages).toEqual([]);

    const complete = { commandId: "c1", chatSessionId: chat, messageId: asked, content: "answer one" };
    await t.mutation(api.completeMessage, complete);
    await t.mutation(api.completeMessage, complete);
    await t.mutation(api.failMessage, { commandId: "x1", chatSessionId: chat, messageId: doomed, reason: "context overflow" });
    const changed = (await allMessages(t, first.cursor)).messages;
    const replies = changed.filter((m) => m.role === "assistant");
    expect(replies).toHaveLength(1);
    expect(replies[0]).toMatchObject({ content: "answer one", completed: true, replyTo: asked, error: null });
    expect(changed.find((m) => m.messageId === doomed)?.error).toBe("context overflow");
  });

  test("an unknown session or message is refused", async () => {
    const t = setup();
    await expect(
      t.mutation(api.renameSession, { commandId: "r", chatSessionId: "not-an-id", title: "x" }),
    ).rejects.toThrow(/no chat session not-an-id/);
    const chat = await openChat(t);
    await expect(
      t.mutation(api.completeMessage, { commandId: "c", chatSessionId: chat, messageId: "nope", content: "x" }),
    ).rejects.toThrow(/no user message nope/);
    // A refused mutation records nothing: the same commandId can still be applied later.
    const applied = await t.run((ctx) => ctx.db.query("appliedCommands").collect());
    expect(applied).toEqual([]);
  });

  test("every function is internal: callable with the deploy key, invisible without it", () => {
    for (const [name, fn] of Object.entries(agentsync)) {
      if (typeof fn !== "function" || !("isRegistered" in fn)) continue;
      expect((fn as any).isInternal, name).toBe(true);
      expect((fn as any).isPublic, name).toBeFalsy();
    }
  });

  test("a 1 MiB message never wedges the cursor: 20 of them page through in bytes", async () => {
    const t = setup();
    const chat = await openChat(t);
    const big = "x".repeat(1024 * 1024 - 1024);
    for (let i = 0; i < 20; i++) await post(t, chat, big + i);
    let cursor: string | null = null;
    let seen = 0;
    let pages = 0;
    for (;;) {
      const page: any = await t.query(api.listMessages, { workerId: W, cursor, limit: 500 });
      pages++;
      // Never an empty page while messages remain: the cursor always moves.
      if (!page.isDone) expect(page.page.length).toBeGreaterThan(0);
      expect(JSON.stringify(page).length).toBeLessThan(agentsync.PAGE_BYTES + 2 * big.length);
      seen += page.page.length;
      if (page.page.length > 0) expect(page.continueCursor).not.toBe(cursor);
      cursor = page.continueCursor;
      if (page.isDone) break;
    }
    expect(seen).toBe(20);
    expect(pages).toBeGreaterThanOrEqual(5);
  });

  test("two workers writing at once each count their own changes, and each sees only its own", async () => {
    const t = setup();
    const a = await openChat(t, "worker-a");
    const b = await openChat(t, "worker-b");
    const asked = await Promise.all([
      ...Array.from({ length: 5 }, (_, i) => post(t, a, `a${i}`)),
      ...Array.from({ length: 5 }, (_, i) => post(t, b, `b${i}`)),
    ]);
    await Promise.all(
      asked.map((messageId, i) =>
        t.mutation(api.completeMessage, {
          commandId: `completeMessage:${messageId}`,
          chatSessionId: i < 5 ? a : b,
          messageId,
          content: `answer ${i}`,
        }),
      ),
    );
    const counters = await t.run((ctx) => ctx.db.query("counters").collect());
    expect(Object.fromEntries(counters.map((c: any) => [c.name, c.value]))).toEqual({
      // Per worker: its chat opened (1), 5 messages posted and 5 answered, each a message
      // change and a change of the chat session's lastActivity (20).
      "messageChanges:worker-a": 21,
      "messageChanges:worker-b": 21,
    });
    for (const [worker, chat] of [["worker-a", a], ["worker-b", b]]) {
      const page = await t.query(api.listMessages, { workerId: worker, cursor: null, limit: 100 });
      expect(page.page).toHaveLength(10);
      expect(page.page.every((m: any) => m.chatSessionId === chat)).toBe(true);
      expect(page.page.filter((m: any) => m.role === "assistant" && m.completed)).toHaveLength(5);
      expect(page.continueCursor).toBe("20");
      const chats = await t.query(api.listSessions, { workerId: worker, cursor: null, limit: 100 });
      expect(chats.page.map((c: any) => c.chatSessionId)).toEqual([chat]);
      expect(chats.continueCursor).toBe("21");
      const since = await t.query(api.listSessions, { workerId: worker, cursor: "21", limit: 100 });
      expect(since).toEqual({ page: [], isDone: true, continueCursor: "21" });
    }
  });

  test("markSessionFailed keeps its reason", async () => {
    const t = setup();
    const chat = await openChat(t);
    await t.mutation(api.markSessionFailed, { commandId: "f", chatSessionId: chat, reason: "stale for 6 h" });
    const doc: any = await t.run((ctx) => ctx.db.get(chat as any));
    expect(doc).toMatchObject({ status: "failed", failureReason: "stale for 6 h" });
  });

  test("applied commandIds are pruned by the hourly cron after the retention window, in batches", async () => {
    vi.useFakeTimers();
    try {
      const t = setup();
      const chat = await openChat(t);
      const start = Date.now();
      await t.mutation(api.renameSession, { commandId: "old", chatSessionId: chat, title: "one" });
      await t.run(async (ctx) => {
        for (let i = 0; i < agentsync.PRUNE_BATCH + 5; i++) {
          await ctx.db.insert("appliedCommands", { commandId: `bulk${i}`, reply: null, appliedAt: start });
        }
      });
      vi.setSystemTime(start + agentsync.APPLIED_RETENTION_MS - 60_000);
      await t.mutation(api.renameSession, { commandId: "recent", chatSessionId: chat, title: "two" });
      // Within the window a repeat is still recognised.
      expect(await t.mutation(api.pruneAppliedCommands, {})).toEqual({ deleted: 0 });
      await t.mutation(api.renameSession, { commandId: "old", chatSessionId: chat, title: "one" });
      let row = (await t.query(api.listSessions, { workerId: W, cursor: null, limit: 10 })).page[0];
      expect(row.title).toBe("two");
      // Past it, the old ones go (a full batch schedules the rest), the recent one stays.
      vi.setSystemTime(start + agentsync.APPLIED_RETENTION_MS + 1);
      expect(await t.mutation(api.pruneAppliedCommands, {})).toEqual({ deleted: agentsync.PRUNE_BATCH });
      await t.finishAllScheduledFunctions(vi.runAllTimers);
      const left = await t.run((ctx) => ctx.db.query("appliedCommands").collect());
      expect(left.map((d: any) => d.commandId)).toEqual(["recent"]);
      // The cron runs it hourly.
      const jobs = Object.values((crons as any).crons) as any[];
      expect(jobs).toHaveLength(1);
      expect(jobs[0].schedule).toEqual({ type: "interval", hours: 1 });
      expect(String(jobs[0].name)).toContain("agentsync:pruneAppliedCommands");
    } finally {
      vi.useRealTimers();
    }
  });
  test("the upgrade numbers sessions written before change numbers, once, and listSessions then shows them", async () => {
    // Step 1 of README.md's upgrade: the schema with changedAt optional, sessions without it.
    const intermediate = defineSchema({
      ...schema.tables,
      chatSessions: defineTable({ ...chatSessionFields, changedAt: v.optional(v.number()) })
        .index("by_worker", ["workerId"])
        .index("by_worker_change", ["workerId", "changedAt"]),
    });
    const t = convexTest(intermediate, modules);
    const fresh = await openChat(t);
    const old = await t.run(async (ctx) => {
      const row = { agentSessionId: null, model: null, status: "active" as const, project: null };
      const a = await ctx.db.insert("chatSessions", { ...row, workerId: W, title: "old a", lastActivity: 1 });
      const b = await ctx.db.insert("chatSessions", { ...row, workerId: "worker-2", title: "old b", lastActivity: 1 });
      return [a, b];
    });
    const listed = async (workerId: string) =>
      (await t.query(api.listSessions, { workerId, cursor: null, limit: 10 })).page.map((s: any) => s.chatSessionId);
    expect(await listed(W)).toEqual([fresh]); // not listed before: why the upgrade must finish first
    let cursor: string | null = null;
    let numbered = 0;
    for (;;) {
      const r: any = await t.mutation(api.numberChatSessions, { cursor });
      numbered += r.numbered;
      cursor = r.continueCursor;
      if (r.isDone) break;
    }
    expect(numbered).toBe(2);
    expect((await listed(W)).sort()).toEqual([fresh, old[0]].sort());
    expect(await listed("worker-2")).toEqual([old[1]]);
    expect((await t.mutation(api.numberChatSessions, { cursor: null })).numbered).toBe(0);
  });
});
