// The tables behind the agentsync backend contract (see agentsync.ts).
import { defineSchema, defineTable } from "convex/server";
import { v } from "convex/values";

const nullable = <T extends ReturnType<typeof v.string>>(t: T) => v.union(t, v.null());

export default defineSchema({
  chatSessions: defineTable({
    workerId: v.string(),
    agentSessionId: nullable(v.string()),
    title: v.string(),
    model: nullable(v.string()),
    status: v.union(v.literal("active"), v.literal("deleted"), v.literal("failed")),
    lastActivity: v.number(),
    project: nullable(v.string()),
  }).index("by_worker", ["workerId"]),

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

  // Every applied mutation's commandId and its reply: a repeat gets the first reply.
  appliedCommands: defineTable({
    commandId: v.string(),
    reply: v.any(),
  }).index("by_command", ["commandId"]),

  counters: defineTable({
    name: v.string(),
    value: v.number(),
  }).index("by_name", ["name"]),
});
