#!/usr/bin/env bash
# The main job: sets up .venv if needed, then runs the attnkit tour.
# Extra arguments are passed to `attnkit demo`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec attnkit demo "$@"
