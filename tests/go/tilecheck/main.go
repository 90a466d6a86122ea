// tilecheck verifies a twokey audit log as a standard C2SP tlog-tiles client
// does, with golang.org/x/mod/sumdb/tlog (vendored in ./tlog, unchanged,
// from golang.org/x/mod at commit fe2ec04, as ../notecheck vendors
// sumdb/note): it opens the checkpoint with sumdb/note and the log's verifier
// key, reads hash tiles through tlog.TileHashReader (which authenticates
// every tile against the checkpoint), checks that the tree hash is the
// checkpoint's root, reads the entry bundles, checks every entry's record
// hash against the hash tiles, the inclusion proofs of -proofs entries, and
// a consistency proof from half the tree.
//
// Usage:
//
//	tilecheck -key VERIFIER_KEY -dir DATA_DIR/log
//	tilecheck -key VERIFIER_KEY -url https://127.0.0.1:PORT -ca CA -cert CERT -tlskey KEY
//
// Prints "checkpoint ORIGIN SIZE", then "entry I RECORD_HASH_HEX" for each
// entry, "proved P" (inclusion proofs checked), "consistent N SIZE" and
// "ok"; exits 1 with the reason when
// the log does not verify, 2 on bad usage.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"twokey.test/notecheck/note"
	"twokey.test/tilecheck/tlog"
)

// height is C2SP tlog-tiles' tile height: 256 hashes a tile.
const height = 8

// source reads a log resource by its C2SP path ("checkpoint", "tile/0/000").
type source interface {
	read(path string) ([]byte, error)
}

type dirSource string

func (d dirSource) read(path string) ([]byte, error) {
	return os.ReadFile(filepath.Join(string(d), filepath.FromSlash(path)))
}

type httpSource struct {
	base   string
	client *http.Client
}

func (h httpSource) read(path string) ([]byte, error) {
	resp, err := h.client.Get(h.base + "/" + path)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 32<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET /%s: %s: %s", path, resp.Status, body)
	}
	want := "application/octet-stream"
	if path == "checkpoint" {
		want = "text/plain; charset=utf-8"
	}
	if got := resp.Header.Get("Content-Type"); got != want {
		return nil, fmt.Errorf("GET /%s: Content-Type %q, want %q", path, got, want)
	}
	return body, nil
}

// c2spPath is the C2SP tlog-tiles path of t: sumdb's own path
// (tile/8/L/N, tile/8/data/N) without the height, data tiles as "entries".
func c2spPath(t tlog.Tile) string {
	p := strings.TrimPrefix(t.Path(), fmt.Sprintf("tile/%d/", height))
	if t.L == -1 {
		p = "entries/" + strings.TrimPrefix(p, "data/")
	}
	return "tile/" + p
}

// tileReader is a tlog.TileReader over a source.
type tileReader struct {
	src   source
	reads int
}

func (r *tileReader) Height() int { return height }

func (r *tileReader) ReadTiles(tiles []tlog.Tile) ([][]byte, error) {
	out := make([][]byte, len(tiles))
	for i, t := range tiles {
		data, err := r.src.read(c2spPath(t))
		if err != nil {
			return nil, err
		}
		r.reads++
		out[i] = data
	}
	return out, nil
}

func (r *tileReader) SaveTiles([]tlog.Tile, [][]byte) {}

type checkpoint struct {
	origin string
	tree   tlog.Tree
}

// parseCheckpoint reads a C2SP tlog-checkpoint body: origin, size, root,
// then optional extension lines.
func parseCheckpoint(text string) (checkpoint, error) {
	lines := strings.SplitN(text, "\n", 4)
	if len(lines) < 4 || lines[0] == "" {
		return checkpoint{}, errors.New("checkpoint: fewer than three lines")
	}
	size, err := strconv.ParseInt(lines[1], 10, 64)
	if err != nil || size < 0 || strconv.FormatInt(size, 10) != lines[1] {
		return checkpoint{}, fmt.Errorf("checkpoint: bad size %q", lines[1])
	}
	root, err := base64.StdEncoding.DecodeString(lines[2])
	if err != nil || len(root) != tlog.HashSize {
		return checkpoint{}, fmt.Errorf("checkpoint: bad root %q", lines[2])
	}
	var h tlog.Hash
	copy(h[:], root)
	return checkpoint{origin: lines[0], tree: tlog.Tree{N: size, Hash: h}}, nil
}

// entries splits an entry bundle: each entry a big-endian uint16 length,
// then its bytes.
func entries(bundle []byte) ([][]byte, error) {
	var out [][]byte
	for len(bundle) > 0 {
		if len(bundle) < 2 {
			return nil, errors.New("entry bundle: truncated length")
		}
		n := int(binary.BigEndian.Uint16(bundle))
		if len(bundle) < 2+n {
			return nil, fmt.Errorf("entry bundle: entry %d runs past the end", len(out))
		}
		out = append(out, bundle[2:2+n])
		bundle = bundle[2+n:]
	}
	return out, nil
}

func main() {
	key := flag.String("key", "", "the log's note verifier key")
	dir := flag.String("dir", "", "read tiles from this directory (DATA_DIR/log)")
	url := flag.String("url", "", "read tiles over HTTPS from this base URL")
	ca := flag.String("ca", "", "CA certificate (PEM) of the server, with -url")
	cert := flag.String("cert", "", "client certificate (PEM), with -url")
	tlskey := flag.String("tlskey", "", "client key (PEM), with -url")
	proofs := flag.Int("proofs", 1000, "check inclusion proofs of about this many entries, spread evenly, and of the last")
	flag.Parse()
	if *key == "" || (*dir == "") == (*url == "") {
		fmt.Fprintln(os.Stderr, "usage: tilecheck -key VERIFIER_KEY (-dir DIR | -url URL -ca CA -cert CERT -tlskey KEY)")
		os.Exit(2)
	}
	var src source = dirSource(*dir)
	if *url != "" {
		client, err := tlsClient(*ca, *cert, *tlskey)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		src = httpSource{base: strings.TrimSuffix(*url, "/"), client: client}
	}
	if err := check(src, *key, *proofs); err != nil {
		fmt.Fprintln(os.Stderr, "log does not verify:", err)
		os.Exit(1)
	}
	fmt.Println("ok")
}

func tlsClient(ca, cert, key string) (*http.Client, error) {
	pem, err := os.ReadFile(ca)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("%s: no certificate", ca)
	}
	pair, err := tls.LoadX509KeyPair(cert, key)
	if err != nil {
		return nil, err
	}
	return &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			TLSClientConfig: &tls.Config{
				RootCAs:      roots,
				Certificates: []tls.Certificate{pair},
				MinVersion:   tls.VersionTLS12,
			},
			ForceAttemptHTTP2: true,
		},
	}, nil
}

func check(src source, key string, proofs int) error {
	verifier, err := note.NewVerifier(key)
	if err != nil {
		return fmt.Errorf("verifier key: %v", err)
	}
	msg, err := src.read("checkpoint")
	if err != nil {
		return err
	}
	n, err := note.Open(msg, note.VerifierList(verifier))
	if err != nil {
		return fmt.Errorf("checkpoint note: %v", err)
	}
	cp, err := parseCheckpoint(n.Text)
	if err != nil {
		return err
	}
	fmt.Printf("checkpoint %s %d\n", cp.origin, cp.tree.N)
	if cp.tree.N == 0 {
		return nil
	}
	tr := &tileReader{src: src}
	hr := tlog.TileHashReader(cp.tree, tr)
	th, err := tlog.TreeHash(cp.tree.N, hr)
	if err != nil {
		return fmt.Errorf("tree hash: %v", err)
	}
	if th != cp.tree.Hash {
		return fmt.Errorf("tree hash %v is not the checkpoint's root %v", th, cp.tree.Hash)
	}
	stride := cp.tree.N / int64(proofs)
	if stride < 1 {
		stride = 1
	}
	proved := 0
	for start := int64(0); start < cp.tree.N; start += 1 << height {
		w := cp.tree.N - start
		if w > 1<<height {
			w = 1 << height
		}
		t := tlog.Tile{H: height, L: -1, N: start >> height, W: int(w)}
		bundle, err := src.read(c2spPath(t))
		if err != nil {
			return err
		}
		es, err := entries(bundle)
		if err != nil {
			return fmt.Errorf("%s: %v", c2spPath(t), err)
		}
		if int64(len(es)) != w {
			return fmt.Errorf("%s: %d entries, want %d", c2spPath(t), len(es), w)
		}
		// The level-0 hashes from the (authenticated) hash tiles.
		indexes := make([]int64, len(es))
		for k := range es {
			indexes[k] = tlog.StoredHashIndex(0, start+int64(k))
		}
		stored, err := hr.ReadHashes(indexes)
		if err != nil {
			return fmt.Errorf("%s: hashes: %v", c2spPath(t), err)
		}
		for k, e := range es {
			i := start + int64(k)
			rh := tlog.RecordHash(e)
			if stored[k] != rh {
				return fmt.Errorf("entry %d: record hash %v, hash tile says %v", i, rh, stored[k])
			}
			fmt.Printf("entry %d %x\n", i, rh[:])
			if i%stride != 0 && i != cp.tree.N-1 {
				continue
			}
			proof, err := tlog.ProveRecord(cp.tree.N, i, hr)
			if err != nil {
				return fmt.Errorf("entry %d: inclusion proof: %v", i, err)
			}
			if err := tlog.CheckRecord(proof, cp.tree.N, cp.tree.Hash, i, rh); err != nil {
				return fmt.Errorf("entry %d: inclusion proof does not check: %v", i, err)
			}
			proved++
		}
	}
	fmt.Printf("proved %d\n", proved)
	old := (cp.tree.N + 1) / 2
	oldHash, err := tlog.TreeHash(old, hr)
	if err != nil {
		return fmt.Errorf("tree hash of %d: %v", old, err)
	}
	proof, err := tlog.ProveTree(cp.tree.N, old, hr)
	if err != nil {
		return fmt.Errorf("consistency proof: %v", err)
	}
	if err := tlog.CheckTree(proof, cp.tree.N, cp.tree.Hash, old, oldHash); err != nil {
		return fmt.Errorf("consistency %d → %d does not check: %v", old, cp.tree.N, err)
	}
	fmt.Printf("consistent %d %d\n", old, cp.tree.N)
	return nil
}
