// The tables behind the agentsync backend contract (see agentsync.ts).
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

const nullable = <T extends ReturnType<typeof v.string>>(t: T) => v.union(t, v.null());

/** A chat session's fields (exported for the upgrade's intermediate schema: README.md). */
export const chatSessionFields = {
  workerId: v.string(),
  agentSessionId: nullable(v.string()),
  title: v.string(),
  model: nullable(v.string()),
  status: v.union(v.literal("active"), v.literal("deleted"), v.literal("failed")),
  lastActivity: v.number(),
  project: nullable(v.string()),
  // markSessionFailed's reason (the worker's listing does not read it; your app shows it).
  failureReason: v.optional(v.string()),
  // Bumped on every write (the worker's counter): listSessions pages through changes after
  // a cursor, so a worker reads at each poll only what changed.
  changedAt: v.number(),
};

export default defineSchema({
  chatSessions: defineTable(chatSessionFields)
    .index("by_worker", ["workerId"])
    .index("by_worker_change", ["workerId", "changedAt"]),

  messages: defineTable({
    workerId: v.string(),
    chatSessionId: v.id("chatSessions"),
    role: v.union(v.literal("user"), v.literal("assistant")),
    content: v.string(),
    completed: v.boolean(),
    timestamp: v.number(),
    replyTo: v.union(v.id("messages"), v.null()),
    error: v.union(v.string(), v.null()),
    // Bumped on every change: listMessages pages through changes after a cursor.
    changedAt: v.number(),
  })
    .index("by_worker_change", ["workerId", "changedAt"])
    .index("by_reply", ["replyTo"]),

  // Every applied mutation's commandId and its reply: a repeat gets the first reply. Pruned
  // after APPLIED_RETENTION_MS (agentsync.ts) by crons.ts.
  appliedCommands: defineTable({
    commandId: v.string(),
    reply: v.any(),
    appliedAt: v.number(),
  })
    .index("by_command", ["commandId"])
    .index("by_applied_at", ["appliedAt"]),

  // One change counter per worker, for its messages and chat sessions: `messageChanges:<workerId>`.
  counters: defineTable({
    name: v.string(),
    value: v.number(),
  }).index("by_name", ["name"]),
});
