#!/bin/sh
# Answers the probe, then becomes sleep(1): what the daemon gave it (fds, environment,
# signal dispositions, session) is then visible from outside in /proc, untouched by an
# interpreter's own start-up. @CAPS@ is replaced by the capabilities JSON on install.
if [ "$1" = --print-capabilities ]; then
    echo '@CAPS@'
    exit 0
fi
exec sleep 3600
