// The agentsync backend contract (DESIGN.md, "The backend contract") as a Convex module.
//
// Drop this file, crons.ts and schema.ts's tables into your app's convex/ directory: the worker
// calls agentsync:listSessions, agentsync:createSession, ... with its deploy key. Every function
// is internal (internalQuery / internalMutation): a public function may be called by anyone who
// knows the deployment URL, an internal one only with a deploy key (`Authorization: Convex
// <key>`), and without one it is "not found" (convex-backend crates/udf/src/validation.rs:342-365).
//
// Every mutation carries a commandId and is applied at most once: the first reply is recorded in
// `appliedCommands` and returned to any repeat (a worker retries after a lost reply). Convex runs
// each mutation as a serializable transaction, so "check, apply, record" is atomic. Records are
// pruned after APPLIED_RETENTION_MS by a cron (crons.ts, pruneAppliedCommands).
//
// The generic builders keep this file free of codegen; in your app you may import
// `internalQuery` and `internalMutation` from "./_generated/server" instead, with the same code.
import {
  internalMutationGeneric as internalMutation,
  internalQueryGeneric as internalQuery,
  makeFunctionReference,
} from "convex/server";
import type { GenericMutationCtx, GenericQueryCtx, GenericDataModel } from "convex/server";
import { v } from "convex/values";

/**
 * The most bytes one listMessages page reads (Convex's `paginate` `maximumBytesRead`; the page
 * ends with the message that reaches it). Convex refuses a transaction that reads more than
 * 16 MiB (crates/common/src/knobs.rs:585, TRANSACTION_MAX_READ_SIZE_BYTES) or returns more than
 * 16 MiB (knobs.rs:419, FUNCTION_MAX_RESULT_SIZE), and a message is at most 1 MiB
 * (crates/common/src/document.rs:100, MAX_USER_SIZE): a page of at most 4 MiB + one message is
 * well inside both, and never empty while messages remain, so the cursor always moves.
 * The worker's local backend uses the same bound (src/backend/store.rs, MESSAGE_PAGE_BYTES).
 */
export const PAGE_BYTES = 4 * 1024 * 1024;

/**
 * How long an applied commandId is remembered: 8 days, one more than the worker's default
 * retention horizon (`agentsync run --retention-days`, 7). The worker repeats an id only while
 * its command is open, and never once the horizon has passed since the command was planned (the
 * dispatcher cancels it instead: src/dispatch/mod.rs, `retry_horizon_ms`), so every repeat comes
 * within this window of the first application, which is no earlier than the planning, and gets
 * the recorded reply. The extra day is the margin between the two clocks. Within that: one
 * delivery round's attempts (minutes), or, when the deployment or the worker is down
 * mid-attempt, until it is back and resumes the same id; a round that gave up is followed by a
 * new round under a new id (`completeMessage:<msg>#round2`, ...). A worker run with a longer
 * `--retention-days` needs this raised to at least that (docs/architecture.md, "Retention").
 * A repeat after pruning would be applied again: harmless for every mutation but createSession
 * (a second chat session for the same agent session), which is why the worker never sends one.
 */
export const APPLIED_RETENTION_MS = 8 * 24 * 60 * 60 * 1000;

/** How many applied records one pruning run deletes (it schedules itself again for more). */
export const PRUNE_BATCH = 1000;

const pruneSelf = makeFunctionReference<"mutation">("agentsync:pruneAppliedCommands");

type QueryCtx = GenericQueryCtx<GenericDataModel>;
type MutationCtx = GenericMutationCtx<GenericDataModel>;

const listArgs = {
  workerId: v.string(),
  cursor: v.union(v.string(), v.null()),
  limit: v.number(),
};

function pageSize(limit: number): number {
  return Math.max(1, Math.min(Math.floor(limit), 1000));
}

function chatSession(doc: any) {
  return {
    chatSessionId: doc._id,
    agentSessionId: doc.agentSessionId,
    title: doc.title,
    model: doc.model,
    status: doc.status,
    lastActivity: doc.lastActivity,
    project: doc.project,
  };
}

function message(doc: any) {
  return {
    chatSessionId: doc.chatSessionId,
    messageId: doc._id,
    role: doc.role,
    content: doc.content,
    completed: doc.completed,
    timestamp: doc.timestamp,
    replyTo: doc.replyTo,
    error: doc.error,
  };
}

/** Applies `apply` once per commandId; a repeat gets the recorded reply. */
async function once(ctx: MutationCtx, commandId: string, apply: () => Promise<unknown>) {
  const applied = await ctx.db
    .query("appliedCommands")
    .withIndex("by_command", (q) => q.eq("commandId", commandId))
    .unique();
  if (applied !== null) return applied.reply;
  const reply = (await apply()) ?? null;
  await ctx.db.insert("appliedCommands", { commandId, reply, appliedAt: Date.now() });
  return reply;
}

/**
 * The next change number of one worker's messages and chat sessions. Every change reads and
 * writes its worker's counter, so Convex's serializable transactions commit them in counter
 * order and a listMessages or listSessions cursor never skips a late commit. One counter per
 * worker, not one for the whole deployment: workers (and the app posting to different workers)
 * never conflict on it. (Its name predates sessions sharing it; renaming it would restart the
 * numbers under cursors the workers hold.)
 */
async function nextChange(ctx: MutationCtx, workerId: string): Promise<number> {
  const name = `messageChanges:${workerId}`;
  const counter = await ctx.db
    .query("counters")
    .withIndex("by_name", (q) => q.eq("name", name))
    .unique();
  const value = (counter?.value ?? 0) + 1;
  if (counter === null) await ctx.db.insert("counters", { name, value });
  else await ctx.db.patch(counter._id, { value });
  return value;
}

async function session(ctx: QueryCtx, chatSessionId: string) {
  const id = ctx.db.normalizeId("chatSessions", chatSessionId);
  const doc = id === null ? null : await ctx.db.get(id);
  if (doc === null) throw new Error(`no chat session ${chatSessionId}`);
  return doc;
}

async function userMessage(ctx: QueryCtx, chatSessionId: string, messageId: string) {
  const id = ctx.db.normalizeId("messages", messageId);
  const doc = id === null ? null : await ctx.db.get(id);
  if (doc === null || doc.chatSessionId !== chatSessionId || doc.role !== "user") {
    throw new Error(`no user message ${messageId} in chat session ${chatSessionId}`);
  }
  return doc;
}

/** Every write of a chat session goes through here: it gets a new change number. */
async function patchSession(ctx: MutationCtx, doc: any, patch: Record<string, unknown>) {
  const changedAt = await nextChange(ctx, doc.workerId);
  await ctx.db.patch(doc._id, { ...patch, changedAt });
}

async function touch(ctx: MutationCtx, chatSessionId: string, patch: Record<string, unknown>) {
  const doc = await session(ctx, chatSessionId);
  await patchSession(ctx, doc, { ...patch, lastActivity: Date.now() });
  return null;
}

/**
 * One page of the changes after `cursor` (a change number; null: all) in a table's
 * `by_worker_change` index, bounded in documents and in bytes: `.take(n)` is not, and a page of
 * large documents would fail the read limit every time from the same cursor. The range starts
 * after the worker's own change number, so Convex's cursor is not needed (and the end cursor of
 * a finished pagination, which never returns anything again, is never kept).
 */
async function changesAfter(
  ctx: QueryCtx,
  table: "messages" | "chatSessions",
  name: string,
  { workerId, cursor, limit }: { workerId: string; cursor: string | null; limit: number },
) {
  const after = cursor === null || cursor === "" ? 0 : Number(cursor);
  if (!Number.isFinite(after)) throw new Error(`${name}: bad cursor ${cursor}`);
  const range = () =>
    ctx.db
      .query(table)
      .withIndex("by_worker_change", (q) => q.eq("workerId", workerId).gt("changedAt", after));
  const options = { numItems: pageSize(limit), maximumBytesRead: PAGE_BYTES };
  let result = await range().paginate({ cursor: null, ...options });
  // A page cut by the byte bound before its first document (convex-test counts the documents
  // before the range too) would leave the cursor where it is: read on from Convex's cursor
  // until a document comes or the range ends, so the cursor always moves.
  for (let i = 0; result.page.length === 0 && !result.isDone; i++) {
    if (i === 100) throw new Error(`${name}: no document within 100 byte-bounded reads`);
    result = await range().paginate({ cursor: result.continueCursor, ...options });
  }
  const page = result.page;
  const last = page.length > 0 ? page[page.length - 1].changedAt : after;
  return { page, isDone: result.isDone, continueCursor: String(last) };
}

/**
 * The worker's chat sessions changed after the cursor (null: all of them), in change order:
 * a full listing from null, and from the last page's continueCursor what changed since (every
 * write of a session gives it a new change number: create, link, rename, delete, fail, and its
 * lastActivity).
 */
export const listSessions = internalQuery({
  args: listArgs,
  handler: async (ctx, args) => {
    const result = await changesAfter(ctx, "chatSessions", "listSessions", args);
    return { ...result, page: result.page.map(chatSession) };
  },
});

/** The worker's messages changed after the cursor (null: all of them), in change order. */
export const listMessages = internalQuery({
  args: listArgs,
  handler: async (ctx, args) => {
    const result = await changesAfter(ctx, "messages", "listMessages", args);
    return { ...result, page: result.page.map(message) };
  },
});

export const createSession = internalMutation({
  args: {
    commandId: v.string(),
    workerId: v.string(),
    agentSessionId: v.string(),
    title: v.string(),
    model: v.union(v.string(), v.null()),
  },
  handler: (ctx, { commandId, workerId, agentSessionId, title, model }) =>
    once(ctx, commandId, async () => {
      const chatSessionId = await ctx.db.insert("chatSessions", {
        workerId,
        agentSessionId,
        title,
        model,
        status: "active",
        lastActivity: Date.now(),
        project: null,
        changedAt: await nextChange(ctx, workerId),
      });
      return { chatSessionId };
    }),
});

export const linkAgentSession = internalMutation({
  args: { commandId: v.string(), chatSessionId: v.string(), agentSessionId: v.string() },
  handler: (ctx, { commandId, chatSessionId, agentSessionId }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { agentSessionId })),
});

export const renameSession = internalMutation({
  args: { commandId: v.string(), chatSessionId: v.string(), title: v.string() },
  handler: (ctx, { commandId, chatSessionId, title }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { title })),
});

export const markSessionDeleted = internalMutation({
  args: { commandId: v.string(), chatSessionId: v.string() },
  handler: (ctx, { commandId, chatSessionId }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { status: "deleted" })),
});

export const markSessionFailed = internalMutation({
  args: { commandId: v.string(), chatSessionId: v.string(), reason: v.string() },
  handler: (ctx, { commandId, chatSessionId, reason }) =>
    once(ctx, commandId, () =>
      touch(ctx, chatSessionId, { status: "failed", failureReason: reason }),
    ),
});

/** The reply to a user message, if one was started. */
async function replyTo(ctx: QueryCtx, userMessageId: any) {
  return await ctx.db
    .query("messages")
    .withIndex("by_reply", (q) => q.eq("replyTo", userMessageId))
    .first();
}

export const completeMessage = internalMutation({
  args: {
    commandId: v.string(),
    chatSessionId: v.string(),
    messageId: v.string(),
    content: v.string(),
  },
  handler: (ctx, { commandId, chatSessionId, messageId, content }) =>
    once(ctx, commandId, async () => {
      const chat = await session(ctx, chatSessionId);
      const user = await userMessage(ctx, chat._id, messageId);
      const changedAt = await nextChange(ctx, chat.workerId);
      const reply = await replyTo(ctx, user._id);
      if (reply !== null) {
        await ctx.db.patch(reply._id, { content, completed: true, error: null, changedAt });
      } else {
        await ctx.db.insert("messages", {
          workerId: chat.workerId,
          chatSessionId: chat._id,
          role: "assistant",
          content,
          completed: true,
          timestamp: Date.now(),
          replyTo: user._id,
          error: null,
          changedAt,
        });
      }
      await patchSession(ctx, chat, { lastActivity: Date.now() });
      return null;
    }),
});

export const failMessage = internalMutation({
  args: {
    commandId: v.string(),
    chatSessionId: v.string(),
    messageId: v.string(),
    reason: v.string(),
  },
  handler: (ctx, { commandId, chatSessionId, messageId, reason }) =>
    once(ctx, commandId, async () => {
      const chat = await session(ctx, chatSessionId);
      const user = await userMessage(ctx, chat._id, messageId);
      await ctx.db.patch(user._id, {
        error: reason,
        changedAt: await nextChange(ctx, chat.workerId),
      });
      const reply = await replyTo(ctx, user._id);
      if (reply !== null && !reply.completed) {
        await ctx.db.patch(reply._id, {
          error: reason,
          changedAt: await nextChange(ctx, chat.workerId),
        });
      }
      return null;
    }),
});

/**
 * Not called by the worker: how your app opens a chat session a person starts (no agent session
 * yet; the worker creates one when its first message comes), so that it gets a change number
 * (listSessions pages by change number; a session inserted without one is never seen).
 * `openChat` wraps it for tests and scripts.
 */
export async function recordChatSession(
  ctx: MutationCtx,
  workerId: string,
  title: string,
): Promise<string> {
  return await ctx.db.insert("chatSessions", {
    workerId,
    agentSessionId: null,
    title,
    model: null,
    status: "active",
    lastActivity: Date.now(),
    project: null,
    changedAt: await nextChange(ctx, workerId),
  });
}

export const openChat = internalMutation({
  args: { workerId: v.string(), title: v.string() },
  handler: async (ctx, { workerId, title }) => ({
    chatSessionId: await recordChatSession(ctx, workerId, title),
  }),
});

/**
 * Not called by the worker: how your app records a person's message, so that it gets a change
 * number (listMessages pages by change number; a message inserted without one is never seen).
 * Call it from your own (authenticated) mutation; `postUserMessage` wraps it for tests and
 * scripts.
 */
export async function recordUserMessage(
  ctx: MutationCtx,
  chatSessionId: string,
  content: string,
): Promise<string> {
  const chat = await session(ctx, chatSessionId);
  if (chat.status !== "active") throw new Error(`chat session ${chatSessionId} is ${chat.status}`);
  const now = Date.now();
  const messageId = await ctx.db.insert("messages", {
    workerId: chat.workerId,
    chatSessionId: chat._id,
    role: "user",
    content,
    completed: true,
    timestamp: now,
    replyTo: null,
    error: null,
    changedAt: await nextChange(ctx, chat.workerId),
  });
  await patchSession(ctx, chat, { lastActivity: now });
  return messageId;
}

export const postUserMessage = internalMutation({
  args: { chatSessionId: v.string(), content: v.string() },
  handler: async (ctx, { chatSessionId, content }) => ({
    messageId: await recordUserMessage(ctx, chatSessionId, content),
  }),
});

/**
 * Forgets applied commandIds older than APPLIED_RETENTION_MS, at most PRUNE_BATCH per run (a
 * mutation's reads and writes are bounded); with more left it runs again at once. Run hourly
 * by crons.ts.
 */
export const pruneAppliedCommands = internalMutation({
  args: {},
  handler: async (ctx) => {
    const before = Date.now() - APPLIED_RETENTION_MS;
    const old = await ctx.db
      .query("appliedCommands")
      .withIndex("by_applied_at", (q) => q.lt("appliedAt", before))
      .take(PRUNE_BATCH);
    for (const doc of old) await ctx.db.delete(doc._id);
    if (old.length === PRUNE_BATCH) await ctx.scheduler.runAfter(0, pruneSelf, {});
    return { deleted: old.length };
  },
});

/**
 * The upgrade to change-numbered chat sessions (see README.md, "Upgrading"): gives each chat
 * session written before `changedAt` existed its worker's next change number, one page of the
 * table per call, oldest first. Run it with `cursor: null`, then with each `continueCursor`
 * until `isDone`; running it again patches nothing. Only while schema.ts has
 * `changedAt: v.optional(v.number())`: the final schema refuses documents without it.
 */
export const numberChatSessions = internalMutation({
  args: { cursor: v.union(v.string(), v.null()) },
  handler: async (ctx, { cursor }) => {
    const result = await ctx.db.query("chatSessions").paginate({ cursor, numItems: PRUNE_BATCH });
    let numbered = 0;
    for (const doc of result.page) {
      if ((doc as { changedAt?: number }).changedAt !== undefined) continue;
      await ctx.db.patch(doc._id, { changedAt: await nextChange(ctx, doc.workerId) });
      numbered++;
    }
    return { numbered, isDone: result.isDone, continueCursor: result.continueCursor };
  },
});
