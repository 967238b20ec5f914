// Forgets applied commandIds after agentsync.ts's APPLIED_RETENTION_MS (8 days), hourly.
import { cronJobs, makeFunctionReference } from "convex/server";

const crons = cronJobs();
crons.interval(
  "agentsync: prune applied commands",
  { hours: 1 },
  makeFunctionReference<"mutation">("agentsync:pruneAppliedCommands"),
  {},
);
export default crons;
