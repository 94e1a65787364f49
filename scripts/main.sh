#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs every lab experiment and writes
# report/index.html and report/results.json (quick profile: <= 8 minutes on 2 cores).
# Extra arguments are passed to `attnkit report` (e.g. --profile full, --out DIR).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec attnkit report "$@"
