# Shared by the bench scripts' report tables (jq -L scripts, include "bench").

# "met" or "**missed**".
def mark(ok): if ok then "met" else "**missed**" end;

# " (kind: count, ...)" after drover-sim's error total, or nothing when there were none.
def errs:
  if .errors_total > 0
  then " (" + (.errors | to_entries | map("\(.key): \(.value)") | join(", ")) + ")"
  else "" end;

# Milliseconds as seconds, to the millisecond.
def secs: . / 1000 * 1000 | round / 1000;
