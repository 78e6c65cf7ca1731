#!/usr/bin/env bash
# release/notes.sh X.Y.Z: that version's section of CHANGELOG.md, the release's notes. Fails
# when there is none, so no release goes out without its changelog entry.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: release/notes.sh X.Y.Z}
notes=$(awk -v v="$version" '
  /^## \[/ { if (found) exit; found = index($0, "## [" v "]") == 1; next }
  found { print }
' CHANGELOG.md)
[ -n "$(echo "$notes" | tr -d '[:space:]')" ] || { echo "notes: CHANGELOG.md has no section ## [$version]" >&2; exit 1; }
printf '%s\n' "$notes"
