#!/usr/bin/env bash
# Fetch the Kafka broker's jars from Maven Central into testinfra/kafka/target/libs (git-ignored,
# never committed). Run by `make kafka-jars`, so by `make test` and .ci/run; tests/utils/kafka.py starts
# the broker from these jars. Idempotent: a stamp holding pom.xml's checksum marks a complete fetch,
# so a second run does nothing and editing the POM (a version bump) fetches again. Maven's cache
# (~/.m2, or $MAVEN_REPO_LOCAL) makes a re-fetch after `rm -rf target` quick and offline.
set -euo pipefail
KDIR="$(cd "$(dirname "$0")" && pwd)"
LIBS="$KDIR/target/libs"
STAMP="$LIBS/.complete"
MVN_LOG="$KDIR/target/mvn.log"

want="$(sha256sum "$KDIR/pom.xml" | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

command -v mvn >/dev/null 2>&1 || { echo "fetch-jars: mvn not found (apt-get install maven)" >&2; exit 1; }
command -v java >/dev/null 2>&1 || { echo "fetch-jars: java not found (apt-get install openjdk-17-jre-headless)" >&2; exit 1; }

echo "fetch-jars: downloading the Kafka broker classpath into $LIBS"
rm -rf "$LIBS"
mkdir -p "$KDIR/target"
mvn_args=(-B -Dstyle.color=never -f "$KDIR/pom.xml" dependency:copy-dependencies
          -DincludeScope=runtime -DoutputDirectory="$LIBS")
if [[ -n "${MAVEN_REPO_LOCAL:-}" ]]; then
  mvn_args+=(-Dmaven.repo.local="$MAVEN_REPO_LOCAL")
fi
if ! mvn "${mvn_args[@]}" >"$MVN_LOG" 2>&1; then
  tail -n 40 "$MVN_LOG" >&2
  echo "fetch-jars: mvn failed; full output in $MVN_LOG" >&2
  exit 1
fi

for jar in kafka_2.13 kafka-server kafka-clients log4j-core log4j-slf4j-impl; do
  compgen -G "$LIBS/$jar-[0-9]*.jar" >/dev/null || { echo "fetch-jars: $jar missing from $LIBS" >&2; exit 1; }
done
echo "$want" > "$STAMP"
echo "fetch-jars: $(ls "$LIBS"/*.jar | wc -l) jars in $LIBS"
