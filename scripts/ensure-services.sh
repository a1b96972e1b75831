#!/usr/bin/env bash
# Make sure RabbitMQ (5672) and Redis (6379) answer on localhost: use running ones; else start
# locally installed servers; else, where a Docker engine answers, start just those two from
# deploy/docker-compose.yml (`rabbitmq-dev`, a broker with RabbitMQ's default `guest` user and
# `/` vhost, and `redis`); else say exactly what to install.
set -u
cd "$(dirname "$0")/.."

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Docker's port proxy accepts connections before the broker in the container is up: wait for
# the broker's first frame (connection.start) in answer to the AMQP 0-9-1 protocol header.
amqp_answers() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1" && printf 'AMQP\0\0\x09\x01' >&3 \
    && IFS= read -r -n 1 -t 5 -d '' frame <&3) 2>/dev/null
}

wait_for() {  # probe command, name, port, seconds
  for _ in $(seq 1 "$4"); do "$1" "$3" && return 0; sleep 1; done
  echo "ensure-services: $2 did not come up on port $3" >&2
  return 1
}

compose() {
  if docker compose version >/dev/null 2>&1; then docker compose "$@"
  elif command -v docker-compose >/dev/null 2>&1; then docker-compose "$@"
  else return 1; fi
}

start_rabbitmq() {
  if command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-services: starting the local RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
  elif docker info >/dev/null 2>&1; then
    # Not the stack's `rabbitmq`: it imports its own users at boot, so it has no `guest`.
    compose -f deploy/docker-compose.yml --profile dev up -d rabbitmq-dev
  else
    echo "ensure-services: RabbitMQ is not answering on 127.0.0.1:5672 and none is installed." >&2
    echo "  Install it (Debian/Ubuntu: apt-get install rabbitmq-server) or a Docker engine." >&2
    return 1
  fi
  wait_for amqp_answers RabbitMQ 5672 90
}

start_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    echo "ensure-services: starting the local Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 \
      || redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" >/dev/null
  elif docker info >/dev/null 2>&1; then
    compose -f deploy/docker-compose.yml up -d redis
  else
    echo "ensure-services: Redis is not answering on 127.0.0.1:6379 and none is installed." >&2
    echo "  Install it (Debian/Ubuntu: apt-get install redis-server) or a Docker engine." >&2
    return 1
  fi
  wait_for answers Redis 6379 30
}

status=0
amqp_answers 5672 || start_rabbitmq || status=1
answers 6379 || start_redis || status=1
[ "$status" = 0 ] && echo "ensure-services: RabbitMQ and Redis answer"
exit "$status"
