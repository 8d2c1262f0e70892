package main

import (
	"context"
	"os"

	"github.com/kiln-sandbox/kiln/internal/server"
	"github.com/kiln-sandbox/kiln/internal/store"
)

// storeFlag is --store and sealingKeyFlag --sealing-key (server.StoreOptions).
var storeFlag, sealingKeyFlag string

func init() {
	rootCmd.PersistentFlags().StringVar(&storeFlag, "store", os.Getenv("KILN_STORE"),
		"where kiln keeps its state: sqlite (DATA_DIR/kiln.db, the default) or a postgres://user:password@host/db URL shared by several kiln processes")
	rootCmd.PersistentFlags().StringVar(&sealingKeyFlag, "sealing-key", "",
		"file of the 32-byte key that seals secret access keys in the store (default DATA_DIR/secrets.key, made on first use); every control replica sharing a PostgreSQL store needs the same one")
}

// openStore opens the store of --store and --sealing-key in dir: every
// command that touches the store goes through here.
func openStore(ctx context.Context, dir string) (store.Store, error) {
	return server.OpenStore(ctx, server.StoreOptions{DataDir: dir, Store: storeFlag, SealingKey: sealingKeyFlag})
}
