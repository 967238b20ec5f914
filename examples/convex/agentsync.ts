// The agentsync backend contract (DESIGN.md, "The backend contract") as a Convex module.
//
// Drop this file and schema.ts's tables into your app's convex/ directory: the worker calls
// agentsync:listSessions, agentsync:createSession, ... with its deploy key. Every mutation carries
// a commandId and is applied at most once: the first reply is recorded in `appliedCommands` and
// returned to any repeat (a worker retries after a lost reply). Convex runs each mutation as a
// serializable transaction, so "check, apply, record" is atomic.
//
// The generic builders keep this file free of codegen; in your app you may import `query` and
// `mutation` from "./_generated/server" instead, with the same code.
import { mutationGeneric as mutation, queryGeneric as query } from "convex/server";
import type { GenericMutationCtx, GenericQueryCtx, GenericDataModel } from "convex/server";
import { v } from "convex/values";

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
  await ctx.db.insert("appliedCommands", { commandId, reply });
  return reply;
}

async function nextChange(ctx: MutationCtx): Promise<number> {
  const counter = await ctx.db
    .query("counters")
    .withIndex("by_name", (q) => q.eq("name", "messageChanges"))
    .unique();
  const value = (counter?.value ?? 0) + 1;
  if (counter === null) await ctx.db.insert("counters", { name: "messageChanges", value });
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

async function touch(ctx: MutationCtx, chatSessionId: string, patch: Record<string, unknown>) {
  const doc = await session(ctx, chatSessionId);
  await ctx.db.patch(doc._id, { ...patch, lastActivity: Date.now() });
  return null;
}

export const listSessions = query({
  args: listArgs,
  handler: async (ctx, { workerId, cursor, limit }) => {
    const result = await ctx.db
      .query("chatSessions")
      .withIndex("by_worker", (q) => q.eq("workerId", workerId))
      .paginate({ cursor, numItems: pageSize(limit) });
    return {
      page: result.page.map(chatSession),
      isDone: result.isDone,
      continueCursor: result.continueCursor,
    };
  },
});

export const listMessages = query({
  args: listArgs,
  handler: async (ctx, { workerId, cursor, limit }) => {
    const after = cursor === null || cursor === "" ? 0 : Number(cursor);
    if (!Number.isFinite(after)) throw new Error(`listMessages: bad cursor ${cursor}`);
    const size = pageSize(limit);
    const docs = await ctx.db
      .query("messages")
      .withIndex("by_worker_change", (q) => q.eq("workerId", workerId).gt("changedAt", after))
      .take(size + 1);
    const page = docs.slice(0, size);
    const last = page.length > 0 ? page[page.length - 1].changedAt : after;
    return { page: page.map(message), isDone: docs.length <= size, continueCursor: String(last) };
  },
});

export const createSession = mutation({
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
      });
      return { chatSessionId };
    }),
});

export const linkAgentSession = mutation({
  args: { commandId: v.string(), chatSessionId: v.string(), agentSessionId: v.string() },
  handler: (ctx, { commandId, chatSessionId, agentSessionId }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { agentSessionId })),
});

export const renameSession = mutation({
  args: { commandId: v.string(), chatSessionId: v.string(), title: v.string() },
  handler: (ctx, { commandId, chatSessionId, title }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { title })),
});

export const markSessionDeleted = mutation({
  args: { commandId: v.string(), chatSessionId: v.string() },
  handler: (ctx, { commandId, chatSessionId }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { status: "deleted" })),
});

export const markSessionFailed = mutation({
  args: { commandId: v.string(), chatSessionId: v.string(), reason: v.string() },
  handler: (ctx, { commandId, chatSessionId }) =>
    once(ctx, commandId, () => touch(ctx, chatSessionId, { status: "failed" })),
});

/** The reply to a user message, if one was started. */
async function replyTo(ctx: QueryCtx, userMessageId: any) {
  return await ctx.db
    .query("messages")
    .withIndex("by_reply", (q) => q.eq("replyTo", userMessageId))
    .first();
}

export const completeMessage = mutation({
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
      const changedAt = await nextChange(ctx);
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
      await ctx.db.patch(chat._id, { lastActivity: Date.now() });
      return null;
    }),
});

export const failMessage = mutation({
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
      await ctx.db.patch(user._id, { error: reason, changedAt: await nextChange(ctx) });
      const reply = await replyTo(ctx, user._id);
      if (reply !== null && !reply.completed) {
        await ctx.db.patch(reply._id, { error: reason, changedAt: await nextChange(ctx) });
      }
      return null;
    }),
});

/**
 * Not called by the worker: how your app posts a person's message, so that it gets a change
 * number (listMessages pages by change number; a message inserted without one is never seen).
 */
export const postUserMessage = mutation({
  args: { chatSessionId: v.string(), content: v.string() },
  handler: async (ctx, { chatSessionId, content }) => {
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
      changedAt: await nextChange(ctx),
    });
    await ctx.db.patch(chat._id, { lastActivity: now });
    return { messageId };
  },
});
