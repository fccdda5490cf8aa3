#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft: one JVM as broker and controller) on loopback, for tests
# and local runs. Kafka comes from Maven Central (no download site needed); its jars are cached
# in ${XDG_CACHE_HOME:-~/.cache}/postbackd/kafka-<version>.
#
#   deploy/kafka.sh start DIR PORT   fetch if needed, format DIR once, start, wait until ready
#   deploy/kafka.sh stop DIR         SIGTERM, wait for exit
#   deploy/kafka.sh kill DIR         SIGKILL (tests of a broker that dies)
#
# KAFKA_JVM_OPTS replaces the JVM flags (quick-start ones by default, below).
#
# Settings and their reasons: ../shared/reference/real-services.md (small heap, fast restarts,
# the log cleaner's buffer, the ready line).
set -euo pipefail

VERSION=${KAFKA_VERSION:-4.4.0}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/postbackd/kafka-$VERSION
JAVA=${JAVA:-java}
# Flags for a quick start (3-5 s on two cores, see the reference): C1 only, a small heap. A
# benchmark passes server flags instead (benches/run.sh), as a production broker runs.
JVM_OPTS=${KAFKA_JVM_OPTS:--XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xms256m -Xmx256m}

fetch() {
  [ -f "$CACHE/.complete" ] && return 0
  command -v mvn >/dev/null || { echo "kafka.sh: Maven (mvn) is required to fetch Kafka" >&2; exit 1; }
  rm -rf "$CACHE" && mkdir -p "$CACHE/lib"
  cat >"$CACHE/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>postbackd</groupId><artifactId>kafka-fetch</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$VERSION</version>
      <exclusions><exclusion><groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId></exclusion></exclusions>
    </dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>2.25.5</version></dependency>
  </dependencies>
</project>
EOF
  mvn -B -q -Dstyle.color=never -f "$CACHE/pom.xml" dependency:copy-dependencies -DoutputDirectory="$CACHE/lib" >&2
  touch "$CACHE/.complete"
}

start() {
  local dir=$1 port=$2 cport=$(($2 + 1))
  fetch
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  # One broker per directory: a second one would share (and break) the first one's data.
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "kafka.sh: a broker already runs in $dir (pid $(cat "$dir/pid"))" >&2
    exit 1
  fi
  cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/logs
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=2
num.io.threads=2
log.cleaner.dedupe.buffer.size=8388608
broker.session.timeout.ms=3000
broker.heartbeat.interval.ms=500
EOF
  cat >"$dir/log4j2.properties" <<EOF
rootLogger.level=INFO
rootLogger.appenderRef.file.ref=file
appender.file.type=File
appender.file.name=file
appender.file.fileName=$dir/server.log
appender.file.layout.type=PatternLayout
appender.file.layout.pattern=[%d] %p %m (%c)%n
logger.kafka.name=kafka
logger.kafka.level=INFO
logger.apache.name=org.apache
logger.apache.level=WARN
EOF
  local cp="$CACHE/lib/*"
  if [ ! -f "$dir/logs/meta.properties" ]; then
    local id
    # A cluster id starting with '-' would be read as an option by the format tool.
    id=$("$JAVA" -cp "$cp" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    while [[ "$id" == -* ]]; do id=$("$JAVA" -cp "$cp" kafka.tools.StorageTool random-uuid | tail -n 1); done
    "$JAVA" -cp "$cp" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
      kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" >"$dir/format.log" 2>&1
  fi
  local marker
  marker=$(wc -l <"$dir/server.log" 2>/dev/null || echo 0)
  # shellcheck disable=SC2086 # JVM_OPTS is a list of flags
  nohup "$JAVA" $JVM_OPTS \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dlog4j2.shutdownHookEnabled=false \
    -cp "$cp" kafka.Kafka "$dir/server.properties" </dev/null >"$dir/stdout.log" 2>&1 &
  echo $! >"$dir/pid"
  # A restart recovers every partition's log first: a test broker holding the thousands of
  # partitions earlier suites created once took over 60 s on two loaded cores.
  for _ in $(seq 1 1800); do
    if tail -n +"$((marker + 1))" "$dir/server.log" 2>/dev/null | grep -q "Kafka Server started"; then
      return 0
    fi
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "kafka.sh: the broker exited:" >&2
      tail -n 30 "$dir/stdout.log" "$dir/server.log" >&2 || true
      exit 1
    fi
    sleep 0.1
  done
  echo "kafka.sh: the broker did not start within 180 s" >&2
  tail -n 30 "$dir/server.log" >&2 || true
  exit 1
}

stop() {
  local dir=$1 signal=${2:-TERM}
  [ -f "$dir/pid" ] || return 0
  local pid
  pid=$(cat "$dir/pid")
  kill -"$signal" "$pid" 2>/dev/null || true
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start "$2" "$3" ;;
  stop) stop "$2" TERM ;;
  kill) stop "$2" KILL ;;
  *) echo "usage: $0 fetch | start DIR PORT | stop DIR | kill DIR" >&2; exit 2 ;;
esac
