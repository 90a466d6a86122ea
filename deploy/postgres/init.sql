-- twokey's databases and roles in PostgreSQL 15 or newer (docs/HA.md,
-- "Database roles and least privilege"): one database per service, owned by
-- one LOGIN role of the same name, which is no superuser and may not create
-- databases or roles; no other role may connect to it, and only its owner may
-- use or create in its public schema.
--
--   twokey_vault   sealed seeds, used grants, released steps (the vault)
--   twokey_broker  requests, used ids, proposals, the broker's outbox
--   twokey_audit   the signed log
--
-- Run it as a superuser, with psql, on a new server or again at any time (it
-- puts the roles, owners and grants back as written here, and sets each
-- password from its file again):
--
--   psql -v ON_ERROR_STOP=1 -v secrets=/path/to/dir -d postgres -f deploy/postgres/init.sql
--
-- The passwords are not in this script: `secrets` names a directory holding
-- twokey_vault.password, twokey_broker.password and twokey_audit.password,
-- whose first line is the role's password: the same text as each service's
-- [store.postgres] password_file. Without -v secrets=… the directory is
-- /run/secrets/twokey (the official postgres image runs the files of
-- /docker-entrypoint-initdb.d with psql and no variables; compose.ha.yaml
-- mounts the passwords there). The passwords reach the server only as
-- ALTER ROLE … PASSWORD, with statement logging off for this session, and
-- are stored as SCRAM-SHA-256 verifiers.
--
-- pgstore/tests/privileges.rs runs this very file against a real server and
-- checks what it promises.

\set ON_ERROR_STOP on
\if :{?secrets}
\else
  \set secrets /run/secrets/twokey
\endif

SET client_min_messages = warning;
SET log_statement = 'none';
SET log_min_error_statement = panic;
SET password_encryption = 'scram-sha-256';

\set vault_pw `head -n 1 :'secrets'/twokey_vault.password 2>/dev/null`
\set broker_pw `head -n 1 :'secrets'/twokey_broker.password 2>/dev/null`
\set audit_pw `head -n 1 :'secrets'/twokey_audit.password 2>/dev/null`
SELECT :'vault_pw' = '' OR :'broker_pw' = '' OR :'audit_pw' = '' AS twokey_missing_password \gset
\if :twokey_missing_password
  \echo init.sql: a password file is missing or empty: put twokey_vault.password, twokey_broker.password and twokey_audit.password (first line: the password) in the directory given as -v secrets=DIR (default /run/secrets/twokey)
  DO $$ BEGIN RAISE EXCEPTION 'twokey init.sql: a password file is missing or empty; nothing was changed'; END $$;
\endif

-- The roles: log in, nothing more.
SELECT format('CREATE ROLE %I', r)
  FROM unnest(ARRAY['twokey_vault', 'twokey_broker', 'twokey_audit']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) \gexec
ALTER ROLE twokey_vault LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'vault_pw';
ALTER ROLE twokey_broker LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'broker_pw';
ALTER ROLE twokey_audit LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT NOREPLICATION NOBYPASSRLS PASSWORD :'audit_pw';
\unset vault_pw
\unset broker_pw
\unset audit_pw
RESET log_statement;
RESET log_min_error_statement;

-- The databases, each owned by its role.
SELECT format('CREATE DATABASE %I OWNER %I ENCODING %L TEMPLATE template0', d, d, 'UTF8')
  FROM unnest(ARRAY['twokey_vault', 'twokey_broker', 'twokey_audit']) AS d
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = d) \gexec
ALTER DATABASE twokey_vault OWNER TO twokey_vault;
ALTER DATABASE twokey_broker OWNER TO twokey_broker;
ALTER DATABASE twokey_audit OWNER TO twokey_audit;

-- Only its own role connects (PUBLIC has CONNECT and TEMPORARY on every new
-- database by default); grants made by hand to the other services' roles are
-- taken back.
REVOKE ALL ON DATABASE twokey_vault FROM PUBLIC, twokey_broker, twokey_audit;
REVOKE ALL ON DATABASE twokey_broker FROM PUBLIC, twokey_vault, twokey_audit;
REVOKE ALL ON DATABASE twokey_audit FROM PUBLIC, twokey_vault, twokey_broker;
GRANT CONNECT, TEMPORARY ON DATABASE twokey_vault TO twokey_vault;
GRANT CONNECT, TEMPORARY ON DATABASE twokey_broker TO twokey_broker;
GRANT CONNECT, TEMPORARY ON DATABASE twokey_audit TO twokey_audit;

-- In each database the public schema belongs to the service's role, and no
-- one else may use it or create in it (PostgreSQL 15 already takes CREATE
-- from PUBLIC; USAGE goes too, and so does any grant to the other services'
-- roles). The service creates its tables there at start (forward-only
-- migrations) and grants them to no one.
\connect twokey_vault
ALTER SCHEMA public OWNER TO twokey_vault;
REVOKE ALL ON SCHEMA public FROM PUBLIC, twokey_broker, twokey_audit;
\connect twokey_broker
ALTER SCHEMA public OWNER TO twokey_broker;
REVOKE ALL ON SCHEMA public FROM PUBLIC, twokey_vault, twokey_audit;
\connect twokey_audit
ALTER SCHEMA public OWNER TO twokey_audit;
REVOKE ALL ON SCHEMA public FROM PUBLIC, twokey_vault, twokey_broker;
